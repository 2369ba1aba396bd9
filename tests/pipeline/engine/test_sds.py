"""SDS gradient: the formula, per-sample draws, weight schedule and the embedding cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.engine.rng import generator
from pipeline.engine.sds import SdsGuidance, cosine_schedule

# Float results that depend on the CPU's kernels: `make test-numerics` runs them on other kernel paths.
pytestmark = pytest.mark.numerics


@pytest.fixture(scope="module")
def sds(generator_models, tiny_cfg) -> SdsGuidance:
    return SdsGuidance(generator_models, tiny_cfg.sds)


def _z(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_grad_matches_the_formula(sds, generator_models, tiny_cfg) -> None:
    z, seed, it, weight = _z(1), 1234, 7, 640.0
    got = sds.grad(z, ["a red car"], [seed], it, weight)
    # The same draws, by hand: t ~ U{t_min..t_max}, then eps, from the sample's generator.
    gen = generator(seed, "sds", it)
    t = torch.randint(tiny_cfg.sds.t_min, tiny_cfg.sds.t_max + 1, (1,), generator=gen)
    eps = torch.randn(z[0].shape, generator=gen)[None]
    a = generator_models.scheduler.alphas_cumprod[t].float()
    z_t = a.sqrt() * z + (1 - a).sqrt() * eps
    enc = lambda text: sds.text_embedding(text)[None]  # noqa: E731
    with torch.no_grad():
        e_u = generator_models.unet(z_t, t, encoder_hidden_states=enc("")).sample
        e_c = generator_models.unet(z_t, t, encoder_hidden_states=enc(tiny_cfg.sds.prefix + "a red car")).sample
    e = e_u + tiny_cfg.sds.guidance_scale * (e_c - e_u)
    want = tiny_cfg.sds.grad_scale * (e - eps) * weight / tiny_cfg.sds.normalizer
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_per_sample_draws_do_not_depend_on_the_batch(sds) -> None:
    z = _z(3, seed=1)
    batch = sds.grad(z, ["a", "b c", "d"], [1, 2, 3], 0, 800.0)
    alone = sds.grad(z[1:2], ["b c"], [2], 0, 800.0)
    # Equal up to float summation order (guidance 30 amplifies the last bits).
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-4, atol=1e-4 * float(alone.abs().max()))
    again = sds.grad(z[1:2], ["b c"], [2], 1, 800.0)
    assert not torch.allclose(alone, again)  # a new iteration draws new t and eps


def test_timesteps_stay_in_range(sds, tiny_cfg) -> None:
    z = _z(1)
    ts = {int(sds._draws(z, [s], 0)[0]) for s in range(200)}
    assert min(ts) >= tiny_cfg.sds.t_min and max(ts) <= tiny_cfg.sds.t_max
    assert len(ts) > 100


def test_nan_is_zeroed(sds) -> None:
    z = _z(2)
    z[0, 0, 0, 0] = float("nan")
    g = sds.grad(z, ["a", "b"], [1, 2], 0, 800.0)
    assert torch.isfinite(g).all()


def test_weight_schedule_is_cosine_over_the_run(sds, tiny_cfg) -> None:
    total = 160
    w = [sds.weight(i, total) for i in range(total)]
    assert w[0] == pytest.approx(tiny_cfg.sds.weight_start) and w[-1] == pytest.approx(tiny_cfg.sds.weight_end)
    assert all(a >= b for a, b in zip(w, w[1:]))
    assert w[(total - 1) // 2] == pytest.approx(
        (tiny_cfg.sds.weight_start + tiny_cfg.sds.weight_end) / 2, rel=0.01
    )
    assert cosine_schedule(1.0, 0.5, 5, 0) == 0.5


def test_text_embeddings_are_computed_once_per_prompt(generator_models, tiny_cfg) -> None:
    fresh = SdsGuidance(generator_models, dataclasses.replace(tiny_cfg.sds))
    calls = []
    hook = generator_models.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        for it in range(3):
            fresh.grad(_z(2), ["a red car", "a red car"], [1, 2], it, 800.0)
    finally:
        hook.remove()
    assert len(calls) == 2  # the prefixed prompt and ""
