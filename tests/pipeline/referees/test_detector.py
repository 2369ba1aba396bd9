"""The detection referee: hand-built detections, the tiny OWLv2 end to end, unparsable prompts."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.config import RefereeSpec, ZooConfig
from pipeline.models.owlv2_pixels import pad_resize
from pipeline.referees.base import RefereeContext
from pipeline.referees.detector import (
    NEAR_CODE,
    UNPARSED,
    DetectorReferee,
    relation_code,
    relation_terms,
    soft_detections,
)

# Float results that depend on the CPU's kernels: `make test-numerics` runs them on other kernel paths.
pytestmark = pytest.mark.numerics

ZC = ZooConfig()


def _detections(a: tuple[float, float], b: tuple[float, float], conf_a: float = 4.0, conf_b: float = 4.0):
    """Three boxes: A's at ``a``, B's at ``b``, a background box at the centre; logits [1, 3, 2]."""
    boxes = torch.tensor([[[*a, 0.2, 0.2], [*b, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9]]])
    logits = torch.tensor([[[conf_a, -6.0], [-6.0, conf_b], [-6.0, -6.0]]])
    return logits, boxes


def _relation_loss(relation: str, a, b, **conf) -> tuple[float, float]:
    log_presence, centres = soft_detections(*_detections(a, b, **conf), temperature=1.0)
    axis, sign = relation_code(relation)
    loss, prob = relation_terms(centres, torch.tensor([axis]), torch.tensor([sign]), ZC)
    return float(loss - log_presence.sum()), float(prob * log_presence.exp().prod())


@pytest.mark.parametrize("relation, holds, fails", [
    ("on the left of", ((0.2, 0.5), (0.8, 0.5)), ((0.8, 0.5), (0.2, 0.5))),
    ("on the right of", ((0.8, 0.5), (0.2, 0.5)), ((0.2, 0.5), (0.8, 0.5))),
    ("on the top of", ((0.5, 0.2), (0.5, 0.8)), ((0.5, 0.8), (0.5, 0.2))),
    ("on top of", ((0.5, 0.2), (0.5, 0.8)), ((0.5, 0.8), (0.5, 0.2))),
    ("on the bottom of", ((0.5, 0.8), (0.5, 0.2)), ((0.5, 0.2), (0.5, 0.8))),
    ("near", ((0.4, 0.5), (0.65, 0.5)), ((0.05, 0.05), (0.95, 0.95))),
    ("next to", ((0.4, 0.5), (0.65, 0.5)), ((0.5, 0.5), (0.5, 0.5))),  # one box for both: not two objects
    ("on side of", ((0.3, 0.4), (0.5, 0.6)), ((0.0, 0.0), (1.0, 1.0))),
])
def test_a_relation_that_holds_costs_less_than_one_that_does_not(relation, holds, fails) -> None:
    good, good_score = _relation_loss(relation, *holds)
    bad, bad_score = _relation_loss(relation, *fails)
    assert good < bad and good_score > 0.5 > bad_score


def test_both_objects_must_be_present() -> None:
    placed = ((0.2, 0.5), (0.8, 0.5))
    both, _ = _relation_loss("on the left of", *placed)
    no_b, score = _relation_loss("on the left of", *placed, conf_b=-5.0)
    assert both < no_b and score < 0.05


def test_soft_centres_follow_the_confident_box() -> None:
    logits, boxes = _detections((0.1, 0.3), (0.9, 0.7), conf_a=8.0, conf_b=8.0)
    log_presence, centres = soft_detections(logits, boxes, temperature=1.0)
    torch.testing.assert_close(centres[0, 0], torch.tensor([0.1, 0.3]), atol=1e-3, rtol=0)
    torch.testing.assert_close(centres[0, 1], torch.tensor([0.9, 0.7]), atol=1e-3, rtol=0)
    assert float(log_presence.exp().min()) > 0.99


def test_an_absent_object_still_gets_a_gradient_towards_appearing() -> None:
    logits, boxes = _detections((0.2, 0.5), (0.8, 0.5))
    logits = logits.clone()
    logits[..., 1] = -40.0  # B nowhere: every box's sigmoid ~ 4e-18, far below any clamp
    logits.requires_grad_(True)
    log_presence, _ = soft_detections(logits, boxes, temperature=1.0)
    (-log_presence.sum()).backward()
    # raising B's logits lowers the loss at full strength: d(-log sigmoid(l))/dl = -(1 - sigmoid(l)) ~ -1
    assert float(-logits.grad[0, :, 1].sum()) == pytest.approx(1.0, abs=1e-5)
    assert relation_code("near") == (NEAR_CODE, 1.0)


def test_preprocessing_pads_to_a_square_with_grey_then_resizes() -> None:
    img = torch.zeros(1, 3, 32, 64)
    out = pad_resize(img, 16)
    assert out.shape == (1, 3, 16, 16)
    assert float(out[..., :7, :].max()) == 0.0 and float(out[..., 9:, :].min()) == pytest.approx(0.5)
    square = torch.rand(1, 3, 16, 16)
    assert pad_resize(square, 16) is square


@pytest.fixture(scope="module")
def detector(generator_models, tiny_cfg) -> DetectorReferee:
    cfg = copy.deepcopy(tiny_cfg)
    spec = RefereeSpec(kind="detector", categories=["spatial"])
    return DetectorReferee(RefereeContext(cfg, spec, generator_models, None, "google/owlv2-base-patch16-ensemble"))


def test_the_detector_reads_the_benchmarks_parse_and_skips_what_it_cannot(detector) -> None:
    prompts = ["a dog on the left of a cat", "a red book and a blue cup", "a girl near a bench"]
    enc = detector.encode(prompts)
    assert enc.skipped == [None, UNPARSED, None]
    assert enc.rows["axis"].tolist() == [0, 0, NEAR_CODE] and enc.rows["sign"].tolist() == [1.0, 1.0, 1.0]
    assert enc.rows["queries"].shape == (3, 2, detector.model.config.projection_dim)
    assert float(enc.rows["queries"][1].abs().max()) == 0.0  # a placeholder, never run
    assert detector.parse("a girl near a bench").subject == "person"


def test_the_tiny_owlv2_gives_finite_losses_and_gradients_to_the_pixels(detector) -> None:
    size = detector.image_size
    assert size == 64
    enc = detector.encode(["a dog on the left of a cat", "a cup on the top of a table"])
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    out = detector.losses(pixels, enc.rows)
    assert out.total.shape == (2,) and torch.isfinite(out.total).all()
    match = detector.match(out)
    assert ((0 <= match) & (match <= 1)).all()
    out.total.sum().backward()
    assert torch.isfinite(pixels.grad).all() and float(pixels.grad.abs().sum()) > 0
    # rows are independent: the second view alone gives its own loss
    alone = detector.losses(pixels[1:].detach(), enc.rows.select(slice(1, 2))).total
    torch.testing.assert_close(alone, out.total[1:].detach(), rtol=1e-5, atol=1e-6)
