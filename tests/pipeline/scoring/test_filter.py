"""Acceptance by score and per-category threshold; the GORS preset."""

from __future__ import annotations

import pytest

from pipeline.config import FilterConfig, load_config, preset_path
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
    cfg = load_config(preset_path("gors"))
    expected = {
        "color": 0.7, "color_template": 0.92, "shape": 0.6, "shape_template": 0.85, "texture": 0.65,
        "texture_template": 0.9, "spatial": 0.8, "non_spatial": 0.75, "complex": 0.4,
    }
    assert cfg.filter.thresholds == expected
    for category, threshold in expected.items():
        assert threshold_for(category, cfg.filter) == threshold
    assert threshold_for("numeracy", cfg.filter) == cfg.filter.default_threshold


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
