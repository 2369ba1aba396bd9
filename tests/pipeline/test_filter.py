"""Acceptance by score and per-category threshold; the GORS preset."""

from __future__ import annotations

import pytest

from pipeline.config import FilterConfig, load_config, preset_path
from pipeline.filter import accept, decide, threshold_for


def test_thresholds_per_category_and_default():
    fcfg = FilterConfig(default_threshold=0.5, thresholds={"color": 0.7, "complex": 0.4})
    assert threshold_for("color", fcfg) == 0.7
    assert threshold_for("complex", fcfg) == 0.4
    assert threshold_for("numeracy", fcfg) == 0.5  # unknown category
    assert threshold_for(None, fcfg) == 0.5
    assert threshold_for("", fcfg) == 0.5


def test_accept_is_score_at_least_threshold():
    fcfg = FilterConfig(default_threshold=0.5, thresholds={"color": 0.7})
    assert accept(0.7, "color", fcfg) and not accept(0.6999, "color", fcfg)
    assert accept(0.5, None, fcfg) and not accept(0.4999, "shape", fcfg)
    assert decide(0.65, "color", fcfg).accepted is False
    assert decide(0.65, "color", fcfg).threshold == 0.7
    assert decide(0.65, "shape", fcfg).accepted is True


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
