"""engine.generator sd_sampling loads SD-1.5 only: the BLIP-2 referee is never used, so never loaded."""

from __future__ import annotations

import copy

from pipeline.models.loading import load_generator_models


def test_sd_sampling_loads_no_referee(tiny_cfg) -> None:
    cfg = copy.deepcopy(tiny_cfg)
    cfg.engine.generator = "sd_sampling"
    gen = load_generator_models(cfg)
    assert gen.referee is None and gen.caption_head is None and gen.referee_tokenizer is None
    assert gen.unet is not None and gen.vae is not None and gen.text_encoder is not None
