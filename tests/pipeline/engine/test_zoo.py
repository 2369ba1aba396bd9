"""The referee zoo in the engine: the paper's path unchanged, one BLIP-2 entry identical to it, weights,
categories and the two combinations (tiny models)."""

from __future__ import annotations

import copy
import hashlib
import math

import pytest
import torch

from pipeline.config import RefereeSpec
from pipeline.engine.invert import InversionEngine, SampleRequest, balance_gradients, per_sample_norm
from tests.numerics import recorded_digest

# Float results that depend on the CPU's kernels: `make test-numerics` runs them on other kernel paths.
pytestmark = pytest.mark.numerics

REQUESTS = [
    SampleRequest("a red book and a blue cup", "p0", 0, 11, "color"),
    SampleRequest("a dog on the left of a cat", "p1", 0, 12, "spatial"),
]
# sha256 (``_digest``) of the tiny engine's images and final losses for REQUESTS without category, at the
# process's thread count, computed at commit 43fcec6 (main just before the zoo) on each kernel path below, with
# the tiny set built on that path as `make test` builds it: the paper's path must still give these bytes. Keys:
# "<torch> <threads> <kernel probe>" (tests/numerics.py); other kernels give other bytes from the same code,
# so each path has its own digest, and an unrecorded path skips and names itself. docs/REPRODUCIBILITY.md.
MAIN_DIGESTS = {
    # ATen AVX512, oneDNN native: an AVX-512 CPU
    "2.13.0+cpu 1 7c0354594882": "927c4dfa6dcad9c102acfdb14d6d8317e3c6a7db62f43cbe11e2c2b3a3ec3a83",
    "2.13.0+cpu 2 7c0354594882": "45cc2ab997263d35e689b51bb685eeb378c69353e62974e44f83922744713fcb",
    # ATen AVX2, oneDNN AVX2: an AVX2 CPU (1 thread measured there too, an AMD EPYC without AVX-512: 64da140b)
    "2.13.0+cpu 1 abd20a562756": "64da140b4a3cbebb8583065ff6d87dd333af06b348ef246306cc80f95f1ffe65",
    "2.13.0+cpu 2 abd20a562756": "c6ddf570bc2a256d2901e98652f4087d85eeffd669e934c2691b8aca64baa53f",
    # ATen AVX2 on an AVX-512 CPU (ATEN_CPU_CAPABILITY=avx2)
    "2.13.0+cpu 1 03a7491983ae": "e4883408ed22efacd8a714299bd5599c68d61e33c04b94f1b401f68ed0147e70",
    "2.13.0+cpu 2 03a7491983ae": "360d7b071adb74ab93d6b8fb43ce25bd7c75b85e7b486c10ea4bee44fb30c8bd",
    # ATen DEFAULT (ATEN_CPU_CAPABILITY=default) with oneDNN AVX-512, AVX2, SSE4.1; its probe depends on threads
    "2.13.0+cpu 1 fad0555ff92d": "e14ce247d7694a8fd2f3385136b6c1340eee93b9f4a715190929a74a5cc138e9",
    "2.13.0+cpu 2 9ffc0a1d0903": "33d76cf29df5528fc447270e2c3b489b9b45693727d459c1aeba9a5692296c81",
    "2.13.0+cpu 1 c65c6e84d830": "9de30612f9d08c80d43ee256012a092c897d3939e995449e165d4fd95eefe90e",
    "2.13.0+cpu 2 0f9363560822": "0ca7de84dcd78a909f5ae532a56536a932cad9160491ee06e19449839c1bce70",
    "2.13.0+cpu 1 b2808c6307ad": "7df2f7b454ff5d8e43446c43a1762369f823d7fbfce6eac94fc88b46936cd65a",
    "2.13.0+cpu 2 cccb475c4059": "d56ab133181836f744a0f4a3ffdff1911d4024df374fbb77abb52379c0152721",
}


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
    """The paper's path (no zoo) at the process's own thread count (OMP_NUM_THREADS)."""
    return InversionEngine(generator_models, tiny_cfg).run(
        [SampleRequest(r.prompt, r.prompt_id, r.sample_index, r.seed) for r in REQUESTS])


def test_the_papers_path_gives_mains_bytes(legacy) -> None:
    got = _digest(legacy)
    assert got == recorded_digest(MAIN_DIGESTS, "the paper's path at 43fcec6", got)


@pytest.mark.parametrize("balance", ["per_referee", "total"])
def test_one_blip2_entry_is_the_papers_path_bit_for_bit(generator_models, tiny_cfg, legacy, balance) -> None:
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
    want = (parts[0] + parts[1])[1]
    # Rounding only (one graph for both referees vs one referee at a time), relative to the gradient's scale:
    # measured at most 6.1e-7 over ATen AVX512 / AVX2 / default, oneDNN native / AVX2, 1 and 2
    # threads; an element-wise rtol fails on the elements near zero. A share of 1/2 for 1/4 moves it by a
    # quarter of the difference of the two balanced directions, far above this bound.
    assert float((g[1] - want).abs().max()) <= 1e-5 * float(want.abs().max())


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
    # Rounding of other batch shapes only: measured <= 1.6e-6 over ATen AVX512 / AVX2 / default, 1 and 2 threads.
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a.image, b.image, rtol=0, atol=1e-4)


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
