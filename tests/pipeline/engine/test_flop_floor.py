"""The plan's multiplicities per category: zoo referees, the category's scorer, monitor checks, early exit."""

from __future__ import annotations

import json

import pytest

from pipeline.budget.run_plan import exit_fractions, rates_from_floor
from pipeline.config_loading import load_config, preset_path
from pipeline.engine.flop_floor import REAL_FLOPS_PER_CALL as F
from pipeline.engine.flop_floor import Assumptions, calls_per_image, floor_per_image
from schemas.prompts import PromptRow

A = Assumptions()


def _flops(cfg, category, joint=None) -> float:
    return floor_per_image(cfg, 989.0, 1.0, category, joint)["flops_per_image"]


def test_the_zoo_adds_each_active_referee_views_and_decoder_backward() -> None:
    paper, zoo = load_config(preset_path("paper")), load_config(preset_path("zoo"))
    it, views = 150, 30
    clip = it * views * F["clip_referee_fwd_bwd"] + F["clip_referee_fwd"] + it * F["vae_decoder_bwd"]
    assert _flops(zoo, "color") - _flops(paper, "color") == pytest.approx(clip)
    detector = it * 4 * F["detector_referee_fwd_bwd"] + F["detector_referee_fwd"] + it * F["vae_decoder_bwd"]
    assert _flops(zoo, "spatial") - _flops(paper, "spatial") == pytest.approx(clip + detector)
    assert _flops(zoo, "spatial") / _flops(paper, "spatial") > 1.5  # what the plan used to leave out


def test_each_category_is_scored_by_its_scorer() -> None:
    cfg = load_config(preset_path("paper"))
    color, spatial = calls_per_image(cfg, A, "color"), calls_per_image(cfg, A, "spatial")
    assert (color["vqa_vision_fwd"], color["spatial_detect_fwd"]) == (1, 0)
    assert (spatial["vqa_vision_fwd"], spatial["spatial_detect_fwd"]) == (0, 1)
    complex_ = calls_per_image(cfg, A, "complex")
    assert (complex_["vqa_vision_fwd"], complex_["clipscore_fwd"], complex_["spatial_detect_fwd"]) == (1, 1, 1)


def test_monitor_checks_and_early_exit() -> None:
    cfg = load_config(preset_path("paper"), ["monitor.enabled=true", "monitor.every=10"])
    off = calls_per_image(load_config(preset_path("paper")), A, "color")
    on = calls_per_image(cfg, A, "color")
    assert on["vae_decoder_fwd"] - off["vae_decoder_fwd"] == 14  # checks at 10, 20, ..., 140
    assert on["vqa_vision_fwd"] - off["vqa_vision_fwd"] == 14
    short = calls_per_image(cfg, A, "color", joint_iterations=60)  # exits at the 6th check on average
    assert short["referee_vit_fwd_bwd"] == 60 * 30 and short["unet_cfg_fwd"] == 60 + 10
    assert short["vae_decoder_fwd"] == 1 + 6


def test_sampling_counts_no_referee() -> None:
    calls = calls_per_image(load_config(preset_path("sd15")), A, "color")
    assert not any(calls[k] for k in calls if k.startswith(("referee_", "qformer_", "clip_referee", "detector")))


def test_the_floor_plan_takes_early_exit_from_an_earlier_run(tmp_path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    monitor = {"categories": {"color": {"iterations_run": 400, "iterations_full": 1600}}}
    (run / "summary.json").write_text(json.dumps({"categories": {}, "monitor": monitor}))
    exits = exit_fractions([str(run)])
    assert exits == {"color": 0.25}
    rows = [PromptRow(row=0, prompt="a red car", prompt_id="0", category="color", seed=None, num_samples=1),
            PromptRow(row=1, prompt="a dog on the left of a cat", prompt_id="1", category="spatial", seed=None,
                      num_samples=1)]
    cfg = load_config(preset_path("paper"), ["monitor.enabled=true"])
    rates = rates_from_floor(cfg, rows, exits)
    no_exit = rates_from_floor(cfg, rows, None)
    assert rates["per_category"]["color"][1] < 0.3 * no_exit["per_category"]["color"][1]
    assert rates["per_category"]["spatial"] == no_exit["per_category"]["spatial"]  # no exits measured there
    assert rates["source"]["exit_fractions"] == {"color": 0.25}
