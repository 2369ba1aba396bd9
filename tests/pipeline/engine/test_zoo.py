"""The referee zoo in the engine: the paper's path unchanged, one BLIP-2 entry identical to it, weights,
categories and the two combinations (tiny models)."""

from __future__ import annotations

import copy
import hashlib
import math
import platform

import pytest
import torch

from pipeline.config import RefereeSpec
from pipeline.engine.invert import InversionEngine, SampleRequest, balance_gradients, per_sample_norm

REQUESTS = [
    SampleRequest("a red book and a blue cup", "p0", 0, 11, "color"),
    SampleRequest("a dog on the left of a cat", "p1", 0, 12, "spatial"),
]
# sha256 of the tiny engine's images and final losses for REQUESTS without category (``_digest`` of
# ``InversionEngine(load_generator_models(tiny), tiny).run(...)``, 1 thread), computed on commit 43fcec6
# (main just before the zoo) with torch 2.13.0+cpu on x86_64: the paper's path must still give these bytes.
MAIN_DIGEST = "927c4dfa6dcad9c102acfdb14d6d8317e3c6a7db62f43cbe11e2c2b3a3ec3a83"
MAIN_DIGEST_ENV = ("2.13.0+cpu", "x86_64")


def _digest(results) -> str:
    h = hashlib.sha256()
    for r in results:
        h.update(r.image.numpy().tobytes())
        h.update(repr(sorted(r.final_losses.items())).encode())
    return h.hexdigest()


def _zoo(base, *specs: dict, balance: str = "per_referee", **engine):
    cfg = copy.deepcopy(base)
    cfg.zoo.referees = [RefereeSpec(**s) for s in specs]
    cfg.zoo.balance = balance
    for k, v in engine.items():
        setattr(cfg.engine, k, v)
    return cfg


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def legacy(generator_models, tiny_cfg):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return InversionEngine(generator_models, tiny_cfg).run(
            [SampleRequest(r.prompt, r.prompt_id, r.sample_index, r.seed) for r in REQUESTS])
    finally:
        torch.set_num_threads(threads)


def test_the_papers_path_gives_mains_bytes(legacy) -> None:
    if (torch.__version__, platform.machine()) != MAIN_DIGEST_ENV:
        pytest.skip(f"digest recorded with torch {MAIN_DIGEST_ENV[0]} on {MAIN_DIGEST_ENV[1]}")
    assert _digest(legacy) == MAIN_DIGEST


@pytest.mark.parametrize("balance", ["per_referee", "total"])
def test_one_blip2_entry_is_the_papers_path_bit_for_bit(generator_models, tiny_cfg, legacy, balance,
                                                        one_thread) -> None:
    results = InversionEngine(generator_models, _zoo(tiny_cfg, {"kind": "blip2"}, balance=balance)).run(REQUESTS)
    assert _digest(results) == _digest(legacy)
    for new, old in zip(results, legacy):
        assert torch.equal(new.image, old.image) and new.final_losses == old.final_losses
        assert new.itm_score == old.itm_score
        assert new.referee_scores == {"blip2": {"kind": "blip2", "score": pytest.approx(old.itm_score),
                                                "loss": old.final_losses["total"], "weight": 1.0}}
        assert new.referee_skipped == {}


@pytest.mark.parametrize("section, key, value", [("augment", "top_k", 2), ("engine", "view_chunk", 3)])
def test_hardest_views_and_view_chunks_stay_bit_identical(generator_models, tiny_cfg, section, key, value,
                                                          one_thread) -> None:
    cfg = copy.deepcopy(tiny_cfg)
    setattr(getattr(cfg, section), key, value)
    cfg.optim.iterations, cfg.optim.tail_iterations = 3, 1
    old = InversionEngine(generator_models, cfg).run(REQUESTS)
    new = InversionEngine(generator_models, _zoo(cfg, {"kind": "blip2"})).run(REQUESTS)
    assert _digest(new) == _digest(old)


def test_the_trace_is_the_same_too(generator_models, tiny_cfg, one_thread) -> None:
    cfg = copy.deepcopy(tiny_cfg)
    cfg.engine.trace = True
    old = InversionEngine(generator_models, cfg).run(REQUESTS[:1])[0].trace
    new = InversionEngine(generator_models, _zoo(cfg, {"kind": "blip2"}, trace=True)).run(REQUESTS[:1])[0].trace
    assert len(old) == len(new)
    for a, b in zip(old, new):
        assert {k: v for k, v in a.items() if k not in ("itm", "caption")} == {
            k: v for k, v in b.items() if k != "loss_blip2"}
        if a["phase"] == "joint":
            assert b["loss_blip2"] == a["total"]


def _grad(engine: InversionEngine, requests, seed: int = 3, iteration: int = 2):
    z = torch.randn(len(requests), 4, 8, 8, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    g_sds = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed + 1))
    text = engine.zoo.encode([r.prompt for r in requests], [r.category for r in requests], z.device)
    g, raw, losses = engine._zoo_grad_once(z, text, [r.seed for r in requests], iteration, g_sds=g_sds)
    return g, raw, losses, g_sds, text


def test_per_referee_balances_each_referee_to_its_share(generator_models, tiny_cfg) -> None:
    specs = ({"kind": "blip2", "weight": 1.0}, {"kind": "clip", "weight": 3.0, "categories": ["spatial"]})
    eng = InversionEngine(generator_models, _zoo(tiny_cfg, *specs))
    g, raw, losses, g_sds, text = _grad(eng, REQUESTS)
    ratio = tiny_cfg.optim.ref_to_sds_ratio
    # the color sample: BLIP-2 alone, balanced as the paper's referee is
    assert float(per_sample_norm(g)[0]) == pytest.approx(ratio * float(per_sample_norm(g_sds)[0]), rel=1e-5)
    assert text.skipped[0] == {"clip": "category 'color' not in its categories ['spatial']"}
    assert math.isnan(float(losses.by_name["clip"][0])) and math.isfinite(float(losses.by_name["clip"][1]))
    # the spatial sample: 1/4 of the budget to BLIP-2's direction, 3/4 to CLIP's, each rescaled on its own
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    parts = []
    for name, share in (("blip2", 0.25), ("clip", 0.75)):
        single = InversionEngine(generator_models, _zoo(tiny_cfg, {"kind": name}))
        t = single.zoo.encode([r.prompt for r in REQUESTS], [r.category for r in REQUESTS], z.device)
        _, g_r, _ = single._zoo_grad_once(z, t, [r.seed for r in REQUESTS], 2, g_sds=g_sds)
        parts.append(share * balance_gradients(g_r, g_sds, ratio))
    torch.testing.assert_close(g[1], (parts[0] + parts[1])[1], rtol=1e-4, atol=1e-6)


def test_total_balances_the_weighted_sum_once(generator_models, tiny_cfg) -> None:
    specs = ({"kind": "blip2", "weight": 1.0}, {"kind": "clip", "weight": 0.5})
    eng = InversionEngine(generator_models, _zoo(tiny_cfg, *specs, balance="total"))
    g, raw, losses, g_sds, _ = _grad(eng, REQUESTS)
    ratio = tiny_cfg.optim.ref_to_sds_ratio
    torch.testing.assert_close(per_sample_norm(g), ratio * per_sample_norm(g_sds), rtol=1e-5, atol=0)
    torch.testing.assert_close(losses.total, losses.by_name["blip2"] + 0.5 * losses.by_name["clip"])
    torch.testing.assert_close(balance_gradients(raw, g_sds, ratio), g)


def test_a_sample_no_referee_judges_gets_no_referee_gradient(generator_models, tiny_cfg) -> None:
    eng = InversionEngine(generator_models, _zoo(tiny_cfg, {"kind": "clip", "categories": ["spatial"]}))
    g, raw, losses, _, text = _grad(eng, REQUESTS)
    assert float(g[0].abs().max()) == 0.0 and float(raw[0].abs().max()) == 0.0
    assert float(g[1].abs().max()) > 0 and float(losses.total[0]) == 0.0


def test_the_zoo_records_scores_and_skips_per_sample(generator_models, tiny_cfg) -> None:
    specs = ({"kind": "blip2"}, {"kind": "clip", "weight": 0.5}, {"kind": "detector", "categories": ["spatial"],
                                                                   "views": 2})
    cfg = _zoo(tiny_cfg, *specs)
    cfg.optim.iterations, cfg.optim.tail_iterations, cfg.optim.warmup = 3, 1, 1
    results = InversionEngine(generator_models, cfg).run(REQUESTS)
    color, spatial = results
    assert color.error is None and spatial.error is None
    assert set(color.referee_scores) == {"blip2", "clip"} and set(color.referee_skipped) == {"detector"}
    assert set(spatial.referee_scores) == {"blip2", "clip", "detector"} and spatial.referee_skipped == {}
    for r in results:
        blip = r.referee_scores["blip2"]
        assert blip["score"] == pytest.approx(r.itm_score) and blip["loss"] == pytest.approx(
            r.final_losses["itm"] + r.final_losses["caption"], rel=1e-6)
        clip = r.referee_scores["clip"]
        assert clip["weight"] == 0.5 and clip["score"] == pytest.approx(max(0.0, 1.0 - clip["loss"]), abs=1e-6)
        assert all(0.0 <= e["score"] <= 1.0 and math.isfinite(e["loss"]) for e in r.referee_scores.values())
    want = sum(e["weight"] * e["loss"] for e in spatial.referee_scores.values())
    assert spatial.final_losses["total"] == pytest.approx(want, rel=1e-5)


def test_a_zoo_without_blip2_has_no_itm_numbers(generator_models, tiny_cfg) -> None:
    cfg = _zoo(tiny_cfg, {"kind": "clip"})
    cfg.optim.iterations, cfg.optim.tail_iterations = 2, 1
    r = InversionEngine(generator_models, cfg).run(REQUESTS[:1])[0]
    assert r.error is None and math.isnan(r.itm_score) and set(r.final_losses) == {"total"}
    assert set(r.referee_scores) == {"clip"}


def test_view_chunks_and_the_oom_fallback_work_on_the_zoo(generator_models, tiny_cfg, monkeypatch) -> None:
    specs = ({"kind": "blip2"}, {"kind": "clip"})
    cfg = _zoo(tiny_cfg, *specs)
    cfg.optim.iterations, cfg.optim.tail_iterations, cfg.optim.warmup = 2, 0, 1
    whole = InversionEngine(generator_models, cfg).run(REQUESTS)
    monkeypatch.setenv("REFEREE_SYNTH_INJECT_OOM", "3")
    eng = InversionEngine(generator_models, cfg)
    chunked = eng.run(REQUESTS)
    assert eng.view_chunk <= 3 and eng.oom_fallbacks
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a.image, b.image, rtol=0, atol=1e-5)


def test_a_non_finite_sample_restarts_alone_in_a_zoo(generator_models, tiny_cfg, monkeypatch) -> None:
    cfg = _zoo(tiny_cfg, {"kind": "blip2"}, {"kind": "clip"})
    cfg.optim.iterations, cfg.optim.tail_iterations, cfg.optim.warmup = 3, 1, 1
    monkeypatch.setenv("REFEREE_SYNTH_INJECT_NAN", "p1:1:1")  # p1's latents NaN at iteration 1, first attempt
    color, spatial = InversionEngine(generator_models, cfg).run(REQUESTS)
    assert color.error is None and color.restarts == []
    assert spatial.error is None and len(spatial.restarts) == 1 and "iteration 1" in spatial.restarts[0]
    assert set(spatial.referee_scores) == {"blip2", "clip"}


def test_a_nan_loss_of_a_judging_referee_is_not_hidden() -> None:
    from pipeline.engine.zoo import _weighted_total

    weights = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    losses = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([math.nan, math.nan])}
    total = _weighted_total(losses, weights)
    assert float(total[0]) == 1.0 and math.isnan(float(total[1]))  # b does not judge sample 0; it does judge 1
