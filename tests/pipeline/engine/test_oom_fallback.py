"""The engine's out-of-memory fallback: halve the view chunk and redo the referee pass."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.engine.invert import INJECT_OOM_ENV, InversionEngine, SampleRequest
from tests.conftest import compbench_prompts

# Float results that depend on the CPU's kernels: `make test-numerics` runs them on other kernel paths.
pytestmark = pytest.mark.numerics

PROMPTS = compbench_prompts("color_val", 2)


def _cfg(base, **engine):
    cfg = copy.deepcopy(base)
    cfg.optim.iterations, cfg.optim.tail_iterations, cfg.optim.warmup = 3, 1, 1
    for k, v in engine.items():
        setattr(cfg.engine, k, v)
    return cfg


def _requests() -> list[SampleRequest]:
    return [SampleRequest(p, f"p{i}", 0, 40 + i) for i, p in enumerate(PROMPTS)]


def _limit_rows(engine: InversionEngine, monkeypatch, limit: int) -> list[int]:
    """Make the referee raise CUDA's OOM error on passes over more than ``limit`` rows."""
    seen: list[int] = []
    real = engine.referee.losses

    def losses(pixels, text):
        seen.append(pixels.shape[0])
        if pixels.shape[0] > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (test: {pixels.shape[0]} rows)")
        return real(pixels, text)

    monkeypatch.setattr(engine.referee, "losses", losses)
    return seen


def test_oom_halves_the_chunk_and_gives_the_chunked_result(generator_models, tiny_cfg, monkeypatch) -> None:
    n = tiny_cfg.augment.num_views  # 4 views x 2 samples = 8 rows in one pass
    engine = InversionEngine(generator_models, _cfg(tiny_cfg))
    seen = _limit_rows(engine, monkeypatch, limit=3)
    results = engine.run(_requests())
    assert all(r.error is None for r in results)
    # 8 rows fail, 4 fail, 2 fit; the smaller chunk is kept for the later iterations.
    assert [(f["view_chunk_was"], f["view_chunk"]) for f in engine.oom_fallbacks] == [(0, 4), (4, 2)]
    assert engine.view_chunk == 2 and engine.oom_fallbacks[0]["iteration"] == 0
    assert seen[:2] == [2 * n, 4] and max(seen[2:]) <= 2 * n  # the final plain-image pass is 2 rows
    want = InversionEngine(generator_models, _cfg(tiny_cfg, view_chunk=2)).run(_requests())
    for a, b in zip(results, want):
        torch.testing.assert_close(a.image, b.image, rtol=0, atol=1e-5)
        assert a.final_losses == pytest.approx(b.final_losses, abs=1e-5)


def test_oom_is_raised_when_the_fallback_is_off_or_exhausted(generator_models, tiny_cfg, monkeypatch) -> None:
    engine = InversionEngine(generator_models, _cfg(tiny_cfg, oom_fallback=False))
    _limit_rows(engine, monkeypatch, limit=3)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        engine.run(_requests())
    assert engine.oom_fallbacks == [] and engine.view_chunk == 0
    engine = InversionEngine(generator_models, _cfg(tiny_cfg))
    _limit_rows(engine, monkeypatch, limit=0)  # not even one view fits
    with pytest.raises(torch.cuda.OutOfMemoryError):
        engine.run(_requests())
    assert engine.view_chunk == 1 and [f["view_chunk"] for f in engine.oom_fallbacks] == [4, 2, 1]


def test_the_debug_hook_injects_the_same_error(generator_models, tiny_cfg, monkeypatch) -> None:
    monkeypatch.setenv(INJECT_OOM_ENV, "5")
    cfg = _cfg(tiny_cfg, view_chunk=6, batch_size=2)
    engine = InversionEngine(generator_models, cfg)
    results = engine.run(_requests())
    assert all(r.error is None for r in results)
    assert engine.view_chunk == 3 and len(engine.oom_fallbacks) == 1
