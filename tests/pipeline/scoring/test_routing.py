"""Category -> scorer: the config, the exactness labels, and what a ScorerSet loads."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError
from pipeline.config_loading import from_dict
from pipeline.scoring.routing import (
    BLIP_VQA,
    CLIPSCORE,
    SPATIAL,
    THREE_IN_ONE,
    models_needed,
    planned_records,
    scorer_for,
    scorers_for,
)
from pipeline.scoring.scorers import ScorerSet


def test_default_routing_is_the_benchmarks() -> None:
    s = from_dict({}).scoring
    assert [scorer_for(c, s) for c in ("color", "shape", "texture")] == [BLIP_VQA] * 3
    assert scorer_for("spatial", s) == SPATIAL and scorer_for("non_spatial", s) == CLIPSCORE
    assert scorer_for("complex", s) == THREE_IN_ONE
    assert scorer_for("numeracy", s) == BLIP_VQA and scorer_for(None, s) == BLIP_VQA
    assert scorers_for(["color", "spatial", "color"], s) == [BLIP_VQA, SPATIAL]
    assert models_needed([SPATIAL]) == {"detector"} and models_needed([THREE_IN_ONE]) == {"vqa", "clip", "detector"}


def test_unknown_scorer_is_a_one_line_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        from_dict({"scoring": {"by_category": {"spatial": "unidet"}}})
    assert "scoring.by_category.spatial" in str(err.value) and "\n" not in str(err.value)
    assert scorer_for("spatial", from_dict({"scoring": {"by_category": {"spatial": "blip_vqa"}}}).scoring) == BLIP_VQA


def test_labels_say_what_is_exact() -> None:
    cfg = from_dict({})
    vqa = {"deviations": [], "vqa_weights": "blip-480"}
    recs = planned_records(cfg, vqa, [BLIP_VQA, CLIPSCORE, SPATIAL, THREE_IN_ONE])
    assert recs[BLIP_VQA]["label"] == "BLIP-VQA (exact)"
    assert recs[SPATIAL]["label"] == "spatial (detector: google/owlv2-base-patch16-ensemble; approximate)"
    assert recs[SPATIAL]["exact"] is False and recs[THREE_IN_ONE]["exact"] is False
    assert recs[THREE_IN_ONE]["label"].startswith("3-in-1 (approximate; spatial part on detector")
    assert recs[CLIPSCORE] == {"scorer": CLIPSCORE, "label": "CLIPScore (exact)", "exact": True, "deviations": [],
                               "model": "openai/clip-vit-base-patch32"}
    other = copy.deepcopy(cfg)
    other.scoring.clip_model = "openai/clip-vit-large-patch14"
    assert planned_records(other, vqa, [CLIPSCORE])[CLIPSCORE]["exact"] is False


def test_spatial_deviations_name_the_vocabulary_and_unidets_real_threshold() -> None:
    """UniDet's effective threshold is 0.1 (its CLI's 0.5 is ignored): 0.1 is no deviation, 0.5 is."""
    cfg = from_dict({})
    devs = planned_records(cfg, None, [SPATIAL])[SPATIAL]["deviations"]
    assert not any("above confidence" in d for d in devs)
    assert any(d.startswith("open vocabulary: nouns outside UniDet's 722 label names") for d in devs)
    other = copy.deepcopy(cfg)
    other.scoring.detection_threshold, other.scoring.spatial_vocabulary = 0.5, "unidet"
    rec = planned_records(other, None, [SPATIAL])[SPATIAL]
    assert any("above confidence 0.5 (UniDet's effective threshold is 0.1" in d for d in rec["deviations"])
    assert not any("open vocabulary" in d for d in rec["deviations"])
    assert rec["label"] == "spatial (detector: google/owlv2-base-patch16-ensemble; UniDet vocabulary; approximate)"


def _image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(2).random((64, 64, 3)) * 255).astype(np.uint8))


def test_spatial_prompt_judged_by_the_spatial_rule_loading_only_the_detector(tiny_cfg) -> None:
    scorers = ScorerSet(tiny_cfg)
    judged = scorers.judge(_image(), "a dog on the left of a cat", "spatial")
    assert judged.scorer == SPATIAL and judged.parts == {SPATIAL: judged.score}
    assert scorers.loaded() == ["detector"]  # no BLIP-VQA, no CLIP


def test_colour_prompt_judged_by_blip_vqa(tiny_cfg, vqa_models) -> None:
    scorers = ScorerSet(tiny_cfg, vqa_models)
    judged = scorers.judge(_image(), "a red car and a blue bird", "color")
    assert judged.scorer == BLIP_VQA and judged.questions == ["a red car?", "a blue bird?"]
    assert judged.score == scorers.vqa.score_stored([_image()], ["a red car and a blue bird"])[0].score
    assert scorers.loaded() == ["vqa"]
    assert scorers.format_score(BLIP_VQA, 0.5) == "0.5000" and scorers.format_score(CLIPSCORE, 0.25) == 0.25
