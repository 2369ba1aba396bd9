"""The CLIP referee on the tiny CLIPModel: 1 - cosine, checked by hand; resolution, gradients, caching."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.config import RefereeSpec
from pipeline.referees.base import RefereeContext
from pipeline.referees.clip import ClipReferee

# Float results that depend on the CPU's kernels: `make test-numerics` runs them on other kernel paths.
pytestmark = pytest.mark.numerics

PROMPTS = ["a red car", "a blue cube and a green bowl on the table"]


@pytest.fixture(scope="module")
def clip(generator_models, tiny_cfg) -> ClipReferee:
    cfg = copy.deepcopy(tiny_cfg)
    spec = RefereeSpec(kind="clip")
    return ClipReferee(RefereeContext(cfg, spec, generator_models, None, "openai/clip-vit-large-patch14"))


def _pixels(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_views_are_at_the_vision_towers_resolution(clip) -> None:
    assert clip.image_size == clip.model.config.vision_config.image_size == 32
    assert clip.resize(torch.rand(2, 3, 64, 64)).shape == (2, 3, 32, 32)
    assert clip.source.endswith("clip")  # the tiny stand-in replaced the hub id


def test_loss_is_one_minus_cosine_computed_by_hand(clip) -> None:
    m, pixels = clip.model, _pixels(32)
    with torch.no_grad():
        ids = clip.tokenizer(PROMPTS, padding=True, return_tensors="pt")
        text = m.text_projection(m.text_model(**ids).pooler_output)  # the EOS token's state
        image = m.visual_projection(m.vision_model(pixel_values=pixels).pooler_output)  # the CLS token's state
        cos = torch.stack([torch.dot(image[i], text[i]) / (image[i].norm() * text[i].norm()) for i in range(2)])
        out = clip.losses(pixels, clip.encode(PROMPTS).rows)
    torch.testing.assert_close(out.total, 1.0 - cos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.parts["cosine"], cos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(clip.match(out), cos.clamp_min(0.0))


def test_rows_are_independent_and_text_is_encoded_once(clip, monkeypatch) -> None:
    pixels = _pixels(32, 2, seed=4)
    enc = clip.encode(PROMPTS)
    both = clip.losses(pixels, enc.rows).total
    alone = clip.losses(pixels[1:], enc.rows.select(slice(1, 2))).total
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-6)
    calls = []
    monkeypatch.setattr(clip.model, "get_text_features", lambda **kw: calls.append(kw))
    clip.encode(PROMPTS)  # both prompts are cached: the text tower does not run
    assert calls == []


def test_gradients_reach_the_pixels(clip) -> None:
    pixels = _pixels(32).requires_grad_(True)
    clip.losses(pixels, clip.encode(PROMPTS).rows).total.sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all() and float(pixels.grad.abs().sum()) > 0
