"""The benchmark's 2D-spatial rule on hand-made boxes, the pixel scale, and OWLv2 detection (tiny)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ScoringConfig
from pipeline.scoring.spatial import (
    Box,
    Detection,
    OwlDetector,
    SpatialScorer,
    benchmark_size,
    first_of,
    iou,
    position_score,
    rule_score,
)
from pipeline.scoring.spatial_prompt import RuleInput, rule_input

S = ScoringConfig()


def pos(relation: str | None, a: Box, b: Box) -> float:
    return position_score(relation, a, b, S.iou_threshold, S.distance_threshold)


def box_at(cx: float, cy: float, half: float = 20.0) -> Box:
    return Box(cx - half, cy - half, cx + half, cy + half)


# --- position: every branch of determine_position ------------------------------------------------


@pytest.mark.parametrize("relation", ["next to", "on side of", "near"])
def test_near_relations_use_the_150_px_distance(relation: str) -> None:
    a = box_at(100, 100)
    assert pos(relation, a, box_at(200, 400)) == 1.0  # |dx| = 100 < 150, though |dy| = 300
    assert pos(relation, a, box_at(400, 300)) == pytest.approx(150 / 300)  # both >= 150: 150 / max


def test_near_at_exactly_the_threshold_is_soft() -> None:
    assert pos("near", box_at(0, 0), box_at(150, 150)) == pytest.approx(1.0)  # 150 / 150, via the soft branch
    assert pos("near", box_at(0, 0), box_at(150, 600)) == pytest.approx(150 / 600)


def test_left_of() -> None:
    a = box_at(100, 100)
    assert pos("on the left of", a, box_at(300, 150)) == 1.0  # B to the right, mostly horizontal, no overlap
    assert pos("on the left of", a, box_at(90, 300)) == 0.0  # B to the left
    assert pos("on the left of", a, box_at(150, 300)) == 0.0  # B right but mostly below
    overlapping = Box(110, 80, 150, 120)  # dx = 30, dy = 0, overlap 10 x 40 of a 2800 union
    assert iou(a, overlapping) == pytest.approx(400 / 2800)
    assert pos("on the left of", a, overlapping) == pytest.approx(0.1 / (400 / 2800))


def test_right_of() -> None:
    a = box_at(300, 100)
    assert pos("on the right of", a, box_at(100, 120)) == 1.0  # B to the left of A
    assert pos("on the right of", a, box_at(400, 100)) == 0.0
    assert pos("on the right of", a, box_at(250, 300)) == 0.0  # B left but mostly below
    overlapping = Box(250, 80, 290, 120)
    assert pos("on the right of", a, overlapping) == pytest.approx(0.1 / iou(a, overlapping))


def test_top_of_and_bottom_of_use_image_y_downwards() -> None:
    a = box_at(100, 100)
    below = box_at(110, 300)
    assert pos("on the top of", a, below) == 1.0  # A above B: B's centre has the larger y
    assert pos("on the bottom of", a, below) == 0.0
    assert pos("on the bottom of", below, a) == 1.0
    assert pos("on the top of", a, box_at(400, 200)) == 0.0  # B below but mostly to the side
    overlapping = Box(80, 110, 120, 150)
    assert pos("on the top of", a, overlapping) == pytest.approx(0.1 / iou(a, overlapping))
    assert pos("on the bottom of", overlapping, a) == pytest.approx(0.1 / iou(a, overlapping))


def test_on_top_of_and_no_relation_score_no_position() -> None:
    """'on top of' is in the benchmark's phrase list, but its rule has no branch for it."""
    a, b = box_at(100, 100), box_at(100, 300)
    assert pos("on the top of", a, b) == 1.0
    assert pos("on top of", a, b) == 0.0
    assert pos(None, a, b) == 0.0


# --- the image score: confidences, first detection per class, the 0.5 cut -------------------------


def test_both_objects_found_score_confidences_and_half_the_position() -> None:
    dets = [Detection("dog", 0.9, box_at(100, 100)), Detection("cat", 0.8, box_at(300, 110))]
    parse = RuleInput("dog", "on the left of", "cat")
    assert rule_score(parse, dets, S) == pytest.approx(0.25 * 0.9 + 0.25 * 0.8 + 0.5)


def test_first_detection_of_a_class_is_used() -> None:
    """The benchmark's obj.index: the first (most confident) detection, even if a later one fits better."""
    dets = [Detection("dog", 0.95, box_at(400, 100)), Detection("cat", 0.9, box_at(300, 100)),
            Detection("dog", 0.6, box_at(100, 100))]
    assert first_of("dog", dets) is dets[0]
    # dog at x=400 is right of the cat: "on the left of" has no position score: 0.2375 + 0.225 < 0.5 -> 0
    assert rule_score(RuleInput("dog", "on the left of", "cat"), dets, S) == 0.0
    assert rule_score(RuleInput("dog", "on the right of", "cat"), dets, S) == pytest.approx(0.25 * 1.85 + 0.5)


def test_scores_under_one_half_become_zero() -> None:
    a, b = box_at(100, 100), box_at(100, 300)
    sure = [Detection("hat", 1.0, a), Detection("rack", 1.0, b)]
    assert rule_score(RuleInput("hat", "on top of", "rack"), sure, S) == 0.5  # 0.5 is not < 0.5: kept
    unsure = [Detection("hat", 0.9, a), Detection("rack", 1.0, b)]
    assert rule_score(RuleInput("hat", "on top of", "rack"), unsure, S) == 0.0
    assert rule_score(RuleInput("hat", "on the top of", "rack"), [sure[0]], S) == 0.0  # one object: <= 0.25
    assert rule_score(RuleInput(None, "near", None), sure, S) == 0.0


def test_same_class_twice_uses_one_box() -> None:
    dets = [Detection("person", 0.8, box_at(100, 100)), Detection("person", 0.7, box_at(400, 100))]
    # both objects resolve to the first "person": centres equal -> near scores 1, left of scores 0
    assert rule_score(RuleInput("person", "near", "person"), dets, S) == pytest.approx(0.4 + 0.5)
    assert rule_score(RuleInput("person", "on the left of", "person"), dets, S) == 0.0


def test_prompt_reading_simple_and_complex() -> None:
    assert rule_input("a girl on the left of a dog") == RuleInput("person", "on the left of", "dog")
    assert rule_input("a dog and a cat") == RuleInput("dog", None, "cat")  # no phrase: objects still count
    # complex: the nouns around the preposition; the relation is still the simple phrase list's
    assert rule_input("The red hat was on top of the brown coat rack.", complex_prompt=True) == RuleInput(
        "hat", "on top of", "coat")
    assert rule_input("a dog and a cat", complex_prompt=True) == RuleInput(None, None, None)


# --- the benchmark's pixel scale ----------------------------------------------------------------


def test_benchmark_size_is_torchvision_resize_479_max_480() -> None:
    assert benchmark_size(512, 512, 479, 480) == (479, 479)
    assert benchmark_size(64, 64, 479, 480) == (479, 479)
    assert benchmark_size(1024, 512, 479, 480) == (480, 240)  # the long side capped at 480
    assert benchmark_size(500, 501, 479, 480) == (479, 479)  # int(479 * 501 / 500) = 479


# --- OWLv2 on the tiny detector -------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector(tiny_cfg) -> OwlDetector:
    from pipeline.models.loading import load_detector

    return OwlDetector(load_detector(tiny_cfg.models, tiny_cfg.scoring.detector_model), tiny_cfg)


def test_boxes_come_back_in_the_benchmark_scale(detector: OwlDetector) -> None:
    """(cx, cy, w, h) of the padded square -> image pixels -> the 479-px scale, most confident first."""
    boxes = torch.tensor([[0.5, 0.25, 0.5, 0.5], [0.25, 0.25, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1]])
    scores, labels = torch.tensor([0.3, 0.6, 0.1]), torch.tensor([0, 1, 0])
    dets = detector._to_detections(boxes, scores, labels, ["dog", "cat"], side=64, size=(64, 32))
    assert [d.label for d in dets] == ["cat", "dog"]  # 0.1 is not above the threshold; most confident first
    # 64 x 32 -> (480, 240): 7.5x; the dog box (16, 0, 48, 32) in image pixels
    assert dets[1].box == Box(16 * 7.5, 0.0, 48 * 7.5, 32 * 7.5)
    assert dets[0].box.center == pytest.approx((16 * 7.5, 16 * 7.5))


def test_pixels_pad_bottom_right_with_grey(detector: OwlDetector, tiny_cfg) -> None:
    size = detector.size
    image = Image.fromarray(np.zeros((size // 2, size, 3), dtype=np.uint8))  # wide: padded below
    pixels, side = detector.pixels(image)
    assert side == size and pixels.shape == (1, 3, size, size)
    mean, std = torch.tensor(tiny_cfg.scoring.clip_mean), torch.tensor(tiny_cfg.scoring.clip_std)
    assert torch.allclose(pixels[0, :, -1, -1], (0.5 - mean) / std)
    assert torch.allclose(pixels[0, :, 0, 0], (0.0 - mean) / std)


def test_spatial_scorer_runs_on_the_tiny_detector(detector: OwlDetector, tiny_cfg) -> None:
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    result = SpatialScorer(detector, tiny_cfg).score_pil(image, "a dog on the left of a cat")
    assert (result.subject, result.relation, result.object) == ("dog", "on the left of", "cat")
    assert result.score == 0.0 or 0.5 <= result.score <= 1.0
    assert len(result.detections) <= 2


def _queried(detector: OwlDetector, cfg, prompt: str) -> tuple[list[list[str]], object]:
    """Score one image and return the queries the detector was asked with (a spy on the real detector)."""
    seen: list[list[str]] = []
    real = detector.detect

    def spy(image, queries):
        seen.append(list(queries))
        return real(image, queries)

    detector.detect = spy
    try:
        image = Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8))
        return seen, SpatialScorer(detector, cfg).score_pil(image, prompt)
    finally:
        detector.detect = real


def test_unidet_vocabulary_never_finds_a_noun_outside_its_labels(detector: OwlDetector, tiny_cfg) -> None:
    """'cow' is not a UniDet label ('cattle, cow' is): the benchmark never finds it, so one object at most
    is found, 0.25 x its confidence < 0.5, and the score is 0."""
    import copy

    unidet = copy.deepcopy(tiny_cfg)
    unidet.scoring.spatial_vocabulary = "unidet"
    unidet.scoring.detection_threshold = 0.0  # every box of the tiny detector counts: the dog is found
    seen, result = _queried(detector, unidet, "a cow on the left of a dog")
    assert seen == [["dog"]] and result.unfindable == ["cow"] and result.score == 0.0
    assert all(d["label"] == "dog" for d in result.detections) and result.detections
    seen, result = _queried(detector, tiny_cfg, "a cow on the left of a dog")
    assert seen == [["cow", "dog"]] and result.unfindable == []
    seen, _ = _queried(detector, unidet, "a dog on the left of a cat")
    assert seen == [["dog", "cat"]]


def test_vocabulary_counts_on_the_shipped_spatial_lists() -> None:
    """scorable_counts against a count made here from spaCy and the label file directly."""
    from pipeline.scoring.questions import load_spacy
    from pipeline.scoring.spatial_vocabulary import scorable_counts
    from tests.conftest import ROOT, compbench_prompts

    labels = set((ROOT / "data" / "t2i-compbench" / "unidet" / "labels.txt").read_text().splitlines())
    assert len(labels) == 677  # 722 names, some repeated across the merged datasets
    nlp = load_spacy("en_core_web_sm")
    for name in ("spatial_val", "spatial_train"):
        prompts = compbench_prompts(name)
        both = 0
        for doc in nlp.pipe(prompts):
            nouns = [{"girl": "person", "boy": "person", "man": "person", "woman": "person"}.get(t.text, t.text)
                     for t in doc if t.pos_ == "NOUN"]
            both += bool(nouns) and nouns[0] in labels and nouns[-1] in labels
        counts = scorable_counts(prompts)
        assert counts == {"open": len(prompts), "unidet": both}
        assert 0.5 * len(prompts) < both < 0.8 * len(prompts)  # about a third name a noun UniDet lacks
