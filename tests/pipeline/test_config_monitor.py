"""The monitor section: off leaves the hash of a run made before it; on changes it; inversion only."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError
from pipeline.config_loading import load_config, preset_path


def test_monitoring_off_leaves_the_hash_and_the_paper_preset_keeps_it_off() -> None:
    paper = load_config(preset_path("paper"))
    assert paper.monitor.enabled is False
    assert load_config(overrides=["monitor.every=3", "monitor.margin=0.2"]).hash() == load_config().hash()
    assert load_config(overrides=["monitor.enabled=true"]).hash() != load_config().hash()


def test_monitoring_needs_the_inversion_engine() -> None:
    with pytest.raises(ConfigError, match="monitor.enabled needs engine.generator inversion"):
        load_config(overrides=["monitor.enabled=true", "engine.generator=sd_sampling"])
    with pytest.raises(ConfigError, match="monitor.every"):
        load_config(overrides=["monitor.every=0"])
