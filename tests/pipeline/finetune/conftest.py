"""A finetune loop on the tiny SD set, shared by the module's tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def finetune_cfg(tiny_cache):
    from pipeline.config_loading import load_config, preset_path

    return load_config(preset_path("tiny"), [f"models.tiny_cache_dir={tiny_cache}"])


@pytest.fixture(scope="session")
def fixed_batch():
    import torch

    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    return images, ["a red car", "a blue cup"], torch.tensor([0.93, 0.61])
