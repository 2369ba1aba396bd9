"""The small model set: same architectures as tiny and real, wider; built and loaded like tiny."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError
from pipeline.config_loading import load_config, preset_path
from pipeline.models.loading import load_generator_models, model_sources
from pipeline.models.tiny import SMALL_SIZES, small_root


def test_small_set_builds_loads_and_keeps_its_widths(tmp_path) -> None:
    cfg = load_config(preset_path("small"), [f"models.tiny_cache_dir={tmp_path}"])
    src = model_sources(cfg.models)
    root = small_root(tmp_path, 0)
    assert (root / "DONE").is_file() and all(p.startswith(str(root)) for p in src.values())
    gen = load_generator_models(cfg)
    vit = gen.referee.config.vision_config
    assert type(gen.referee).__name__ == "Blip2ForImageTextRetrieval"
    assert vit.hidden_size == SMALL_SIZES["vit"]["hidden_size"] and vit.image_size == 64
    assert gen.referee.config.num_query_tokens == SMALL_SIZES["num_query_tokens"]
    assert gen.caption_head.config.hidden_size == SMALL_SIZES["qformer"]["hidden_size"]
    assert tuple(gen.vae.config.block_out_channels) == SMALL_SIZES["vae_channels"]
    assert all(not p.requires_grad for p in gen.referee.parameters())


def test_tiny_and_small_are_exclusive() -> None:
    with pytest.raises(ConfigError, match="models.tiny and models.small"):
        load_config(overrides=["models.tiny=true", "models.small=true"])
