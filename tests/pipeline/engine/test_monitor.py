"""In-loop monitoring on the tiny models: the lockstep path untouched, exits, best iterate, full batches.

The engine-level tests give the engine a scripted score per (prompt_id, check): the exit and best-iterate
logic is what is under test here, on real optimisations; the shard-level tests
(tests/pipeline/test_process_shard_monitor.py) score with the run's real scorer.
"""

from __future__ import annotations

import copy

import torch

from pipeline.engine.augment import ViewAugmenter
from pipeline.engine.invert import InversionEngine, SampleRequest
from pipeline.engine.monitor import EXIT_COMPLETED, EXIT_EARLY, MonitorScore, SampleMonitor
from tests.conftest import compbench_prompts

PROMPTS = compbench_prompts("color_val", 4)
EVERY = 2


def _cfg(base, **monitor):
    cfg = copy.deepcopy(base)
    cfg.engine.batch_size = 2
    cfg.augment.num_views = 2
    cfg.monitor.enabled = True
    cfg.monitor.every = EVERY
    cfg.monitor.margin = 0.0
    for key, value in monitor.items():
        setattr(cfg.monitor, key, value)
    return cfg


def _requests(n: int) -> list[SampleRequest]:
    return [SampleRequest(PROMPTS[i % len(PROMPTS)], f"p{i}", 0, 300 + i, "color") for i in range(n)]


class Scripted:
    """Scores by prompt_id and check number (1-based); threshold 0.5. Records every batch it scores."""

    def __init__(self, scores: dict[str, list[float]]) -> None:
        self.scores = scores
        self.batches: list[list[str]] = []

    def __call__(self, images, requests):
        self.batches.append([r.prompt_id for r in requests])
        out = []
        for r in requests:
            n = sum(b.count(r.prompt_id) for b in self.batches)
            trajectory = self.scores.get(r.prompt_id, [0.0])
            out.append(MonitorScore(trajectory[min(n, len(trajectory)) - 1], 0.5))
        return out


def _run(generator_models, cfg, scores, n=2, sizes=None):
    engine = InversionEngine(generator_models, cfg)
    engine.monitor_score = Scripted(scores)
    if sizes is not None:  # record the batch every SDS pass sees
        grad = engine.sds.grad
        engine.sds.grad = lambda z, *a, **k: (sizes.append(z.shape[0]), grad(z, *a, **k))[1]
    return engine.run(_requests(n))


def test_monitoring_off_and_a_never_exiting_monitor_give_the_lockstep_bytes(generator_models, tiny_cfg):
    """Off: the engine's original lockstep path, even with a scorer at hand. On without exits: the continuous
    loop is the same math, so the same bytes (both computed here, in this process)."""
    off = _cfg(tiny_cfg)
    off.monitor.enabled = False
    engine = InversionEngine(generator_models, off)
    engine.monitor_score = unused = Scripted({})
    lockstep = engine.run(_requests(2))
    watched = _run(generator_models, _cfg(tiny_cfg), {})
    total = tiny_cfg.optim.iterations + tiny_cfg.optim.tail_iterations
    assert unused.batches == []
    for a, c in zip(lockstep, watched):
        assert a.exit_reason is None and a.monitor_trace == []
        assert torch.equal(a.image, c.image) and a.final_losses == c.final_losses
        assert c.exit_reason == EXIT_COMPLETED and c.iterations == total
        assert [t["iteration"] for t in c.monitor_trace] == list(range(EVERY, tiny_cfg.optim.iterations, EVERY))


def test_per_sample_iterations_equal_the_batch_iteration(generator_models, tiny_cfg) -> None:
    """The shared pieces the loop generalised: one iteration per sample gives the batch form's bytes."""
    engine = InversionEngine(generator_models, _cfg(tiny_cfg))
    z = torch.randn(2, 4, 8, 8)
    seeds, prompts = [1, 2], PROMPTS[:2]
    batch = engine.sds.grad(z, prompts, seeds, 3, 500.0)
    assert torch.equal(batch, engine.sds.grad(z, prompts, seeds, [3, 3], [500.0, 500.0]))
    mixed = engine.sds.grad(z, prompts, seeds, [3, 5], [500.0, 400.0])  # batch 2 vs 1: float rounding apart
    torch.testing.assert_close(mixed[1:], engine.sds.grad(z[1:], prompts[1:], seeds[1:], 5, 400.0),
                               rtol=1e-4, atol=1e-5)
    assert not torch.allclose(mixed[:1], engine.sds.grad(z[:1], prompts[:1], seeds[:1], 5, 400.0))
    aug = ViewAugmenter(tiny_cfg.augment, 32)
    images = torch.rand(2, 3, 64, 64)
    assert torch.equal(aug(images, seeds, 4), aug(images, seeds, [4, 4]))
    assert torch.equal(aug(images, seeds, [4, 7])[1:], aug(images[1:], seeds[1:], 7))


def test_an_exited_sample_equals_the_run_stopped_there_and_best_iterate_keeps_the_best(
    generator_models, tiny_cfg
) -> None:
    """p0 clears at checks 1 and 2 (patience 2): it stops at iteration 2 x every. Without a tail its image
    is the iterate that a run which never exits has there, found as that run's best-scored check."""
    cfg = _cfg(tiny_cfg, patience=2)
    cfg.optim.tail_iterations = 0
    exited = _run(generator_models, cfg, {"p0": [0.9, 0.9, 0.0]})
    stop = 2 * EVERY
    assert exited[0].exit_reason == EXIT_EARLY and exited[0].iterations == stop and exited[0].best is None
    assert exited[1].exit_reason == EXIT_COMPLETED and exited[1].iterations == cfg.optim.iterations
    cfg = _cfg(tiny_cfg, early_exit=False, best_iterate=True)
    cfg.optim.tail_iterations = 0
    full = _run(generator_models, cfg, {"p0": [0.1, 0.9, 0.2], "p1": [0.6, 0.1]})
    assert [r.exit_reason for r in full] == [EXIT_COMPLETED, EXIT_COMPLETED]
    assert (full[0].best.iteration, full[0].best.score) == (stop, 0.9)
    assert (full[1].best.iteration, full[1].best.score) == (EVERY, 0.6)
    assert torch.equal(exited[0].image, full[0].best.image)
    assert not torch.equal(full[0].best.image, full[0].image)  # not the last image


def test_exits_refill_the_batch_from_the_queue(generator_models, tiny_cfg) -> None:
    """Five requests, batch 2: an early leaver's slot is taken at once, so every pass is full until the
    queue is empty, and no slot idles or runs twice."""
    cfg = _cfg(tiny_cfg, patience=1)
    cfg.optim.tail_iterations = 1
    engine = InversionEngine(generator_models, cfg)
    engine.monitor_score = Scripted({"p0": [0.9], "p2": [0.0, 0.9], "p3": [0.9]})
    sizes: list[int] = []
    grad = engine.sds.grad
    engine.sds.grad = lambda z, *a, **k: (sizes.append(z.shape[0]), grad(z, *a, **k))[1]
    queue, emptied_at = _requests(5), []

    def feed(n: int) -> list[SampleRequest]:
        taken, queue[:n] = queue[:n], []
        if taken and not queue:
            emptied_at.append(len(sizes))
        return taken

    out = list(engine.stream(feed))
    assert sorted(r.request.prompt_id for r in out) == [f"p{i}" for i in range(5)]
    exits = {r.request.prompt_id: r.exit_reason for r in out}
    assert exits == {"p0": EXIT_EARLY, "p1": EXIT_COMPLETED, "p2": EXIT_EARLY, "p3": EXIT_EARLY, "p4": EXIT_COMPLETED}
    p0 = next(r for r in out if r.request.prompt_id == "p0")  # exits at the first check, then runs the tail
    assert p0.iterations == EVERY + cfg.optim.tail_iterations
    assert p0.monitor_trace == [{"iteration": EVERY, "score": 0.9}]
    assert sum(sizes) == sum(r.iterations for r in out)  # one SDS row per sample-iteration
    assert emptied_at and set(sizes[: emptied_at[0] + 1]) == {2}  # full until the queue ran dry
    assert sizes[-1] == 1  # the shard's tail: the last sample alone


def test_sample_monitor_patience_margin_and_min_iterations(tiny_cfg) -> None:
    cfg = copy.deepcopy(tiny_cfg.monitor)
    cfg.margin, cfg.patience, cfg.min_iterations, cfg.every = 0.1, 2, 4, 2
    m = SampleMonitor(cfg, iterations=10)
    image = torch.zeros(3, 4, 4)
    assert [m.due(i) for i in (1, 2, 10, 12)] == [False, True, True, False]
    assert not m.observe(2, MonitorScore(0.65, 0.5), image)  # above threshold + margin, streak 1
    assert not m.observe(4, MonitorScore(0.55, 0.5), image)  # within the margin: streak reset
    assert not m.observe(6, MonitorScore(0.7, 0.5), image)
    assert m.observe(8, MonitorScore(0.7, 0.5), image)  # two in a row, past min_iterations
    assert not SampleMonitor(cfg, 10).observe(2, MonitorScore(0.9, None), image)  # no threshold: never exits
