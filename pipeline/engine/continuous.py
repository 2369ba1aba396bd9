"""Monitored inversion with continuous batching: samples at different iterations share one batch.

With ``monitor.enabled`` a sample may leave its batch early (``pipeline.engine.monitor``); the free slot
is refilled at once from the caller's queue (``feed``), so the batch stays full until the queue runs dry.
Each slot therefore carries its own iteration counter, optimiser, EMA and schedule position, and every
per-iteration quantity is taken per sample: the SDS weight and draws, the learning rate, the views and
the noise streams, all keyed by (seed, stream, the sample's own iteration) as in the lockstep engine.

Same math as the lockstep engine (``InversionEngine._optimise``): a batch whose samples all start
together and never exit gives the same bytes (tested), because every operation is elementwise or per
sample and the model passes see the same rows. The referee pass runs only on the samples in their
referee phase; samples in their SDS-only tail share the SDS pass. A sample whose values go non-finite
restarts in its slot with its next seed (as in the lockstep engine), or fails after engine.max_restarts.

A sample's ``seconds``: its share of every step it took part in, plus its share of the checks it was
scored in (``monitor_seconds``, also counted apart).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from pipeline.engine.monitor import (
    EXIT_COMPLETED,
    EXIT_EARLY,
    EXIT_FAILED,
    MonitorFn,
    MonitorScore,
    SampleMonitor,
)
from pipeline.engine.passes import balance_gradients
from pipeline.engine.rng import generator
from pipeline.referees.blip2 import RefereeLosses

FeedFn = Callable[[int], list]  # n -> up to n SampleRequests (fewer, or none, when the queue has no more)


@dataclass
class _Live:
    """One slot of the batch: a sample somewhere in its run."""

    slot: object  # invert._Slot
    z: torch.Tensor  # [1, C, H, W] leaf of this sample's optimiser
    opt: torch.optim.Optimizer
    ema: object  # invert.LatentEma
    monitor: SampleMonitor
    joint_end: int  # referee iterations it runs (optim.iterations, or where it exited)
    it: int = 0  # iterations done (referee + tail)
    exit_reason: str = EXIT_COMPLETED
    monitor_seconds: float = 0.0
    checked: tuple[int, torch.Tensor] | None = None  # (it, image) of its last check
    error: str | None = None
    losses: dict[str, float] = field(default_factory=dict)

    @property
    def joint(self) -> bool:
        return self.it < self.joint_end

    def schedule_index(self, iterations: int) -> int:
        """Its position on the run's schedules: the tail after an exit is the run's own tail."""
        return self.it if self.joint else iterations + (self.it - self.joint_end)


class ContinuousBatch:
    """``run(feed)`` yields one SampleResult per request as each finishes (finish order)."""

    def __init__(self, engine, score: MonitorFn | None) -> None:
        self.e = engine
        self.cfg = engine.cfg
        self.score = score

    # ---- slots --------------------------------------------------------------------------------
    def _start(self, slot) -> _Live:
        from pipeline.engine.invert import LatentEma, _make_optimizer

        ocfg = self.cfg.optim
        z = self.e._initial_latents([slot.seed]).requires_grad_(True)
        return _Live(slot, z, _make_optimizer(z, ocfg), LatentEma(z, ocfg.ema_decay),
                     SampleMonitor(self.cfg.monitor, ocfg.iterations), ocfg.iterations)

    def _noise(self, s: _Live, stream: str, k: int) -> torch.Tensor:
        z = s.z
        return torch.randn(z[0].shape, generator=generator(s.slot.seed, stream, k, device=z.device),
                           device=z.device)[None]

    # ---- the loop -----------------------------------------------------------------------------
    def run(self, feed: FeedFn, inject=None) -> Iterator:
        from pipeline.engine.invert import _Slot

        size = self.cfg.engine.batch_size
        live: list[_Live] = []
        while True:
            if len(live) < size:
                live += [self._start(_Slot(r, r.seed)) for r in feed(size - len(live))]
            if not live:
                return
            t0 = time.perf_counter()
            self._step(live, inject)
            share = (time.perf_counter() - t0) / len(live)
            for s in live:
                s.slot.seconds += share
            self._check(live)
            done = self._finish([s for s in live if s.error is None and s.it >= s.joint_end + self._tail])
            order = {id(s): j for j, s in enumerate(live)}
            done += self._failures(live)  # restarts replace their slot in `live`; give-ups are done
            finished = {id(s) for s, _ in done}
            live = [s for s in live if id(s) not in finished]
            for _, result in sorted(done, key=lambda d: order[id(d[0])]):
                yield result

    @property
    def _tail(self) -> int:
        return self.cfg.optim.tail_iterations

    # ---- one iteration of every slot ----------------------------------------------------------
    def _step(self, live: list[_Live], inject) -> None:
        e, ocfg = self.e, self.cfg.optim
        total = ocfg.iterations + ocfg.tail_iterations
        sched = [s.schedule_index(ocfg.iterations) for s in live]
        seeds = [s.slot.seed for s in live]
        prompts = [s.slot.request.prompt for s in live]
        if inject is not None:
            self._inject(live, sched, inject)
        z = torch.cat([s.z.detach() for s in live])
        weights = [e.sds.weight(k, total) for k in sched]
        g_sds = e.sds.grad(z, prompts, seeds, _one_or_each(sched), _one_or_each(weights), e._autocast())
        joint = [j for j, s in enumerate(live) if s.joint]
        if joint:
            self._joint(live, joint, z, g_sds, sched)
        for j, s in enumerate(live):
            if s.joint:
                continue
            with torch.no_grad():
                noise = self._noise(s, "tail-noise", sched[j])
                s.z.sub_(ocfg.sds_step * g_sds[j : j + 1] + ocfg.tail_noise_std * noise)
        flags = (~torch.isfinite(torch.cat([s.z.detach() for s in live]).flatten(1)).all(dim=1)).tolist()
        for j, s in enumerate(live):
            if flags[j] and s.error is None:
                s.error = f"non-finite latents at iteration {sched[j]}"
        for j, s in enumerate(live):
            if s.joint and s.error is None:
                s.ema.update(s.z)
                if sched[j] + 1 in ocfg.ema_restarts:
                    s.ema.restart(s.z)
            s.it += 1

    def _joint(self, live: list[_Live], joint: list[int], z: torch.Tensor, g_sds: torch.Tensor,
               sched: list[int]) -> None:
        """The referee + SDS update of the slots in their referee phase (one referee pass for all of them)."""
        from pipeline.engine.invert import learning_rate

        e, ocfg = self.e, self.cfg.optim
        every = len(joint) == len(live)
        rows = [live[j] for j in joint]
        zj = (z if every else z[joint]).clone().requires_grad_(True)
        gj = g_sds if every else g_sds[joint]
        seeds = [s.slot.seed for s in rows]
        prompts = [s.slot.request.prompt for s in rows]
        its = _one_or_each([sched[j] for j in joint])
        if e.zoo is None:
            g_raw, losses = e._referee_grad(zj, e.referee.encode(prompts), seeds, its)
            g_bal = balance_gradients(torch.nan_to_num(g_raw), gj, ocfg.ref_to_sds_ratio)
        else:
            text = e.zoo.encode(prompts, [s.slot.request.category for s in rows], e.device)
            g_bal, g_raw, losses = e._referee_grad(zj, text, seeds, its,
                                                   once=lambda *a: e._zoo_grad_once(*a, g_sds=gj))
        bad = (~torch.isfinite(losses.total.view(-1, 1)).all(dim=1) | ~torch.isfinite(g_raw.flatten(1)).all(dim=1))
        for jj, (j, s) in enumerate(zip(joint, rows)):
            k = sched[j]
            for group in s.opt.param_groups:
                group["lr"] = learning_rate(ocfg, k)
            s.z.grad = g_bal[jj : jj + 1] + ocfg.noise_std * self._noise(s, "grad-noise", k)
            s.opt.step()
            with torch.no_grad():
                s.z.sub_(ocfg.sds_step * g_sds[j : j + 1])
                s.z.add_(ocfg.noise_std * self._noise(s, "z-noise", k))
        for jj, flag in enumerate(bad.tolist()):
            if flag and rows[jj].error is None:
                rows[jj].error = f"non-finite referee loss or gradient at iteration {sched[joint[jj]]}"

    def _inject(self, live: list[_Live], sched: list[int], inject) -> None:
        prompt_id, at, attempts = inject
        for s, k in zip(live, sched):
            hit = s.slot.request.prompt_id == prompt_id and at == k
            if hit and (attempts is None or s.slot.attempt < attempts):
                with torch.no_grad():
                    s.z.fill_(float("nan"))

    # ---- failures, checks, finished samples ---------------------------------------------------
    def _failures(self, live: list[_Live]) -> list[tuple[_Live, object]]:
        """Restart a failed slot in place with its next seed, or give it up (a failed result)."""
        from pipeline.engine.invert import SampleResult, restart_seed

        out = []
        for j, s in enumerate(live):
            if s.error is None:
                continue
            slot = s.slot
            if slot.attempt < self.cfg.engine.max_restarts:
                slot.restarts.append(f"{s.error} (seed {slot.seed})")
                slot.attempt += 1
                slot.seed = restart_seed(slot.seed, slot.attempt)
                live[j] = self._start(slot)
                live[j].monitor_seconds = s.monitor_seconds  # earlier attempts' checks stay counted
                continue
            tries = slot.attempt + 1
            error = f"{s.error} (seed {slot.seed}); gave up after {tries} attempt{'s' if tries > 1 else ''}"
            out.append((s, SampleResult(
                request=slot.request, image=None, itm_score=float("nan"), final_losses={}, iterations=s.it,
                seed=slot.seed, error=error, trace=None, seconds=slot.seconds, restarts=list(slot.restarts),
                exit_reason=EXIT_FAILED, monitor_trace=list(s.monitor.trace), monitor_seconds=s.monitor_seconds)))
        return out

    @torch.no_grad()
    def _check(self, live: list[_Live]) -> None:
        """Score the slots due for a check, in one decode; record, and start the tail of those that exit."""
        due = [s for s in live if s.error is None and s.joint and s.monitor.due(s.it)]
        if not due or self.score is None:
            return
        t0 = time.perf_counter()
        # decoded as the final image is (no autocast): a check's image is the image a stop there gives
        images = self.e._decode(torch.cat([s.z.detach() for s in due])).float().cpu()
        checks: list[MonitorScore] = self.score(images, [s.slot.request for s in due])
        share = (time.perf_counter() - t0) / len(due)
        for s, image, check in zip(due, images, checks):
            s.slot.seconds += share
            s.monitor_seconds += share
            s.checked = (s.it, image)
            if s.monitor.observe(s.it, check, image):
                s.joint_end = s.it
                s.exit_reason = EXIT_EARLY

    @torch.no_grad()
    def _finish(self, done: list[_Live]) -> list[tuple[_Live, object]]:
        """Decode the finished slots' latents and score the plain images with the referee (as _finish)."""
        from pipeline.engine.invert import SampleResult

        if not done:
            return []
        e = self.e
        z = torch.cat([s.z.detach() for s in done])
        # A slot that finishes where it was just checked (no tail) keeps the checked image: the same bytes.
        if all(s.checked is not None and s.checked[0] == s.it for s in done):
            images = torch.stack([s.checked[1] for s in done]).to(e.device)
        else:
            images = e._decode(z)  # as the lockstep engine's _finish: no autocast
        prompts = [s.slot.request.prompt for s in done]
        zoo_scores = zoo_skipped = None
        if e.zoo is None:
            losses = e.referee.losses(e.augmenter.plain(images), e.referee.encode(prompts))
        else:
            text = e.zoo.encode(prompts, [s.slot.request.category for s in done], e.device)
            zoo_scores, zl, parts = e.zoo.final(images, text)
            zoo_skipped = text.skipped
            blip2 = next((parts[r.name] for r in e.zoo.referees if r.kind == "blip2" and r.name in parts), {})
            nan = torch.full_like(zl.total, float("nan"))
            losses = RefereeLosses(blip2.get("itm", nan), blip2.get("caption", nan), zl.total.float().cpu())
        images = images.float().cpu()
        finite = torch.isfinite(losses.total.float().cpu()) & torch.isfinite(images.flatten(1)).all(dim=1)
        out = []
        for j, s in enumerate(done):
            if not bool(finite[j]):
                s.error = f"non-finite final image or referee loss at iteration {s.it}"
                continue
            vals = {k: float(getattr(losses, k)[j]) for k in ("itm", "caption", "total")}
            zoo = {}
            if zoo_scores is not None and zoo_skipped is not None:
                vals = {k: v for k, v in vals.items() if v == v}  # no BLIP-2 referee: no ITM numbers
                zoo = dict(referee_scores=zoo_scores[j], referee_skipped=zoo_skipped[j])
            itm = vals.get("itm", float("nan"))
            out.append((s, SampleResult(
                request=s.slot.request, image=images[j], itm_score=math.exp(-itm),
                final_losses=vals, iterations=s.it, seed=s.slot.seed, error=None, trace=None,
                seconds=s.slot.seconds, restarts=list(s.slot.restarts), exit_reason=s.exit_reason,
                monitor_trace=list(s.monitor.trace), best=s.monitor.best, monitor_seconds=s.monitor_seconds,
                **zoo)))
        return out  # a non-finite final image has its error set: _failures restarts or gives it up


def _one_or_each(values: Sequence):
    """One value when all samples agree (the lockstep engine's exact call), else the list."""
    return values[0] if all(v == values[0] for v in values) else list(values)
