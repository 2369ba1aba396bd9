"""Acceptance by score and per-category threshold; the GORS preset."""

from __future__ import annotations

import pytest

from pipeline.config import FilterConfig
from pipeline.config_loading import load_config, preset_path
from pipeline.scoring.filter import accept, decide, threshold_for


def test_thresholds_per_category_and_default():
    fcfg = FilterConfig(default_threshold=0.5, thresholds={"color": 0.7, "complex": 0.4})
    assert threshold_for("color", fcfg) == 0.7
    assert threshold_for("complex", fcfg) == 0.4
    assert threshold_for("numeracy", fcfg) == 0.5  # unknown category
    assert threshold_for(None, fcfg) == 0.5
    assert threshold_for("", fcfg) == 0.5


def test_accept_is_score_strictly_above_threshold():
    """GORS: reward > threshold; a score equal to the threshold is rejected."""
    fcfg = FilterConfig(default_threshold=0.5, thresholds={"color": 0.7})
    assert accept(0.7001, "color", fcfg) and not accept(0.7, "color", fcfg) and not accept(0.6999, "color", fcfg)
    assert accept(0.5001, None, fcfg) and not accept(0.5, None, fcfg) and not accept(0.4999, "shape", fcfg)
    assert decide(0.65, "color", fcfg).accepted is False
    assert decide(0.65, "color", fcfg).threshold == 0.7
    assert decide(0.65, "shape", fcfg).accepted is True
    assert decide(0.0, None, FilterConfig(default_threshold=0.0)).accepted is False


def test_comparison_is_in_float32_as_gors_torch_reward():
    """0.92 as a float32 reward equals the float32 threshold 0.92, though float64 0.92000001 > 0.92."""
    import numpy as np
    import torch

    fcfg = FilterConfig(default_threshold=0.92)
    assert not accept(0.92000001, None, fcfg)
    reward = torch.zeros(1, 1)
    for answer in ("0.9200", "0.9201", "0.9199", "0.7000"):
        reward[0] = float(answer)
        assert accept(float(answer), None, fcfg) == bool(reward[0] > 0.92)
    assert np.float32(0.92000001) == np.float32(0.92)


def test_template_prompts_get_the_template_thresholds():
    cfg = load_config(preset_path("gors"))
    assert decide(0.9, "color", cfg.filter, template=True) == decide(0.9, "color_template", cfg.filter)
    assert threshold_for("color", cfg.filter, template=True) == 0.92
    assert threshold_for("color", cfg.filter, template=False) == 0.7
    assert threshold_for("spatial", cfg.filter, template=True) == 0.8  # no template key: one threshold
    assert threshold_for(None, cfg.filter, template=True) == cfg.filter.default_threshold


def test_gors_preset_loads_with_the_paper_thresholds():
    """GORS's comments' numbers, but non_spatial on the raw cosine the benchmark writes: 0.75 / 2.5."""
    cfg = load_config(preset_path("gors"))
    expected = {
        "color": 0.7, "color_template": 0.92, "shape": 0.6, "shape_template": 0.85, "texture": 0.65,
        "texture_template": 0.9, "spatial": 0.8, "non_spatial": 0.75 / 2.5, "complex": 0.4,
    }
    assert cfg.filter.thresholds == pytest.approx(expected)
    for category, threshold in expected.items():
        assert threshold_for(category, cfg.filter) == pytest.approx(threshold)
    assert threshold_for("numeracy", cfg.filter) == cfg.filter.default_threshold


def test_the_inferred_threshold_is_a_recorded_deviation():
    from pipeline.scoring.filter import selection_record

    record = selection_record(load_config(preset_path("gors")).filter)
    assert not record["exact"] and len(record["deviations"]) == 1
    assert record["deviations"][0].startswith("non_spatial threshold 0.3 is inferred: ")
    assert "2.5" in record["deviations"][0] and "raw" in record["deviations"][0]
    assert selection_record(load_config(preset_path("paper")).filter)["exact"]


def test_an_inferred_reason_needs_its_threshold():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="filter.inferred names colour"):
        load_config(None, ["filter.inferred={colour: a typo}"])


def test_reasons_leave_the_hash_alone_and_the_vocabulary_changes_it():
    base = load_config(None)
    assert load_config(None, ["filter.thresholds={color: 0.5}", "filter.inferred={color: why}"]).hash() == \
        load_config(None, ["filter.thresholds={color: 0.5}"]).hash()
    assert load_config(None, ["scoring.spatial_vocabulary=unidet"]).hash() != base.hash()
    assert load_config(None, ["scoring.spatial_vocabulary=open"]).hash() == base.hash()


def test_every_scorer_is_selected_on_the_value_the_benchmark_writes():
    """BLIP-VQA's value is its 4-decimal string; the other scorers' raw floats (0.80003 stays above 0.8)."""
    fcfg = FilterConfig(default_threshold=0.8)
    assert decide(0.80003, None, fcfg, scorer="spatial_detector").accepted
    assert decide(0.80003, None, fcfg, scorer="three_in_one").accepted
    assert not decide(0.80003, None, fcfg, scorer="blip_vqa").accepted  # written "0.8000"
    assert not decide(0.80003, None, fcfg).accepted  # no scorer named: BLIP-VQA
    assert not decide(0.7999999, None, fcfg, scorer="clipscore").accepted


@pytest.mark.parametrize("bad", ["filter.default_threshold=1.5", "filter.thresholds={color: -0.1}"])
def test_thresholds_out_of_range_rejected(bad):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError):
        load_config(None, [bad])


def test_unscorable_prompts_are_a_choice():
    fcfg = FilterConfig(default_threshold=0.5)
    assert not decide(1.0, None, fcfg, scorable=False).accepted  # default: no question, no acceptance
    assert decide(1.0, None, fcfg, scorable=True).accepted
    fcfg.accept_unscorable = True
    assert decide(1.0, None, fcfg, scorable=False).accepted
    assert not FilterConfig().accept_unscorable


def test_tiny_non_spatial_samples_can_pass_the_gors_preset(tiny_cache) -> None:
    """On the raw-cosine scale some non_spatial samples of the tiny demo pass (at 0.75 none could)."""
    import numpy as np
    from PIL import Image

    from pipeline.scoring.scorers import ScorerSet
    from tests.conftest import compbench_prompts

    cfg = load_config([preset_path("tiny"), preset_path("gors")], [f"models.tiny_cache_dir={tiny_cache}"])
    scorers, rng = ScorerSet(cfg), np.random.default_rng(0)
    scores = [scorers.judge(Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)), p, "non_spatial").score
              for p in compbench_prompts("non_spatial_val", 24)]
    accepted = [decide(s, "non_spatial", cfg.filter, scorer="clipscore").accepted for s in scores]
    assert any(accepted) and not all(accepted)
    assert max(scores) < 0.75
