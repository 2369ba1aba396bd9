"""pipeline/engine/gpu_plan.py: the view chunk from free memory (given numbers), weights cast once, block-wise
compilation (traced with the eager backend on the CPU: the plumbing, not the speed)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pipeline.config_loading import load_config, preset_path
from pipeline.engine.gpu_plan import cast_frozen_weights, divisors, plan_view_chunk, transformer_blocks
from pipeline.engine.invert import InversionEngine, SampleRequest
from pipeline.errors import UserError
from tests.conftest import compbench_prompts


def _paper_plan(free_gib: float, batch: int, cast: bool = False, keep: int | None = None):
    cfg = load_config(preset_path("paper"), [])
    ec, ac = cfg.engine, cfg.augment
    return plan_view_chunk(free_gib, batch, ac.num_views, ac.top_k if keep is None else keep, ec.memory_per_view_gib,
                           ec.memory_per_image_gib, 0.0 if cast else ec.memory_autocast_copies_gib,
                           ec.memory_headroom_gib)


def test_batch_4_of_the_paper_preset_fits_an_80_gb_h100_with_headroom() -> None:
    # An 80 GB H100 shows ~79.2 GiB; the real-size models' float32 weights take ~10 GiB before the engine starts.
    plan = _paper_plan(79.2 - 10.0, 4)
    assert plan.fits and plan.rows == (120,) and plan.view_chunk == 60  # two equal chunks of 60 views
    peak = 10.0 + plan.activations_gib + plan.fixed_gib - 8.0  # weights + activations + VAE + autocast copies
    assert peak <= 79.2 - 8.0  # 8 GiB (engine.memory_headroom_gib) left free
    assert _paper_plan(139.0 - 10.0, 4).view_chunk == 0  # an H200: all 120 views in one pass
    assert _paper_plan(79.2 - 10.0, 8).view_chunk == 60  # batch 8: 240 rows, 4 chunks of 60 (32 GiB of VAE)
    tight = _paper_plan(79.2 - 10.0, 4, keep=10)  # top-10 of 30: passes of 120 and 40 rows
    assert tight.rows == (120, 40) and 40 % (tight.view_chunk or 120) == 0 and 120 % (tight.view_chunk or 120) == 0
    none = _paper_plan(20.0, 4)
    assert not none.fits and none.view_chunk == 1


def test_divisors_largest_first() -> None:
    assert divisors(120)[:4] == [120, 60, 40, 30] and divisors(1) == [1] and divisors(7) == [7, 1]


def test_weights_cast_once_norms_stay_float32(generator_models) -> None:
    models = copy.deepcopy(generator_models)
    n = cast_frozen_weights([models.referee, models.vae])
    assert n > 0 and cast_frozen_weights([models.referee, models.vae]) == 0  # once
    for m in [*models.referee.modules(), *models.vae.modules()]:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            assert m.weight.dtype == torch.bfloat16
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and m.weight is not None:
            assert m.weight.dtype == torch.float32


def _requests(n: int) -> list[SampleRequest]:
    prompts = compbench_prompts("color_val", n)
    return [SampleRequest(p, f"p{i}", 0, 300 + i) for i, p in enumerate(prompts)]


def _cfg(tiny_cache, *overrides: str):
    base = ["models.tiny_cache_dir=" + str(tiny_cache), "optim.iterations=2", "optim.tail_iterations=1",
            "optim.warmup=1", "optim.ema_restarts=[]"]
    return load_config(preset_path("tiny"), [*base, *overrides])


def test_cast_weights_run_under_bf16_autocast_and_match_autocast_casting(generator_models, tiny_cache) -> None:
    with pytest.raises(UserError, match="needs bf16 autocast"):
        InversionEngine(copy.deepcopy(generator_models), _cfg(tiny_cache, "engine.cast_weights=bf16"))
    cfg = _cfg(tiny_cache, "engine.autocast=bf16")
    plain = InversionEngine(generator_models, cfg)
    cast = InversionEngine(copy.deepcopy(generator_models), _cfg(tiny_cache, "engine.autocast=bf16",
                                                                 "engine.cast_weights=bf16"))
    assert cast.models.referee.vision_model.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    z = plain._initial_latents([1, 2]).requires_grad_(True)
    text = plain.referee.encode(["a red car", "a blue bird"])
    g_plain, l_plain = plain._referee_grad(z, text, [1, 2], 0)
    g_cast, l_cast = cast._referee_grad(z, text, [1, 2], 0)
    # autocast casts a float32 weight to the same bf16 values each pass: the loop's passes agree
    torch.testing.assert_close(l_cast.total, l_plain.total, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(g_cast, g_plain, rtol=5e-2, atol=1e-4)
    (result,) = cast.run(_requests(1))
    assert result.error is None and torch.isfinite(result.image).all()


def test_block_wise_compile_traces_each_block_and_keeps_the_numbers(generator_models, tiny_cache) -> None:
    torch._dynamo.reset()
    models = copy.deepcopy(generator_models)
    cfg = _cfg(tiny_cache, "engine.view_chunk=2", "engine.compile=true", "engine.compile_backend=eager",
               "engine.batch_size=2")
    compiled = InversionEngine(models, cfg)
    blocks = transformer_blocks(models.referee.vision_model)
    assert blocks and all(hasattr(b.forward, "_torchdynamo_orig_callable") for b in blocks)
    eager = InversionEngine(generator_models, _cfg(tiny_cache, "engine.view_chunk=2", "engine.batch_size=2"))
    a, b = compiled.run(_requests(2)), eager.run(_requests(2))
    for x, y in zip(a, b):
        torch.testing.assert_close(x.image, y.image, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
