"""The inversion engine: Algorithm 1 of the paper (BLIP-2 inversion + SDS) on batches of samples.

Per iteration i < optim.iterations, for every sample of the batch at once:
  g_sds  = SDS gradient at z (weighted, normalised; ``pipeline.engine.sds``)
  g_ref  = d/dz of the referee loss averaged over augmented views, rescaled per sample so that
           ||g_ref|| = ref_to_sds_ratio * ||g_sds||
  Adam (or SGD) step on g_ref + noise, lr warm-up then cosine lr_start -> lr_end
  z -= sds_step * g_sds;  z += noise
  EMA of z; after iterations listed in ema_restarts (1-based, as Algorithm 1 counts) z := copy(EMA)
then optim.tail_iterations SDS-only steps z -= sds_step * g_sds + tail_noise_std * noise, and the
image x = clamp(VAE.decode(z / scale) / 2 + 0.5, 0, 1).

Batching never changes the math: every norm is per sample, every random draw comes from the
sample's own seed (``pipeline.engine.rng``), the optimiser is elementwise. A sample whose latents or
losses become non-finite is frozen, then rerun with a new seed derived from the old one (up to
engine.max_restarts times); the others are unaffected.

Several referees (``zoo.referees``, ``pipeline.engine.zoo``): the same loop, with g_ref the zoo's combined,
balanced gradient; an empty list is the paper's single BLIP-2 referee on the code path below, unchanged.

Memory: the referee pass over B x N views is the engine's peak. ``engine.view_chunk`` caps how
many views go through the referee at once (same sum, so the same math). With
``engine.oom_fallback`` a CUDA out-of-memory error in the referee pass halves the chunk (the
whole batch of views at first) and redoes that pass of the iteration; nothing of the iteration
has been applied by then (the SDS draw before it is pure), so the result is the one the smaller
chunk gives from the start. The smaller chunk is kept for the engine's later iterations.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from pipeline.config import Config, OptimConfig
from pipeline.engine.augment import ViewAugmenter
from pipeline.engine.gpu_plan import ChunkPlan, cast_frozen_weights, compile_blocks, plan_view_chunk
from pipeline.engine.monitor import MonitorBest, MonitorFn
from pipeline.engine.passes import autocast_for, balance_gradients, per_sample_norm, view_chunks
from pipeline.engine.rng import generator, initial_latents, stable_seed
from pipeline.engine.sds import SdsGuidance, cosine_schedule
from pipeline.engine.zoo import RefereeZoo, ZooLosses, ZooText
from pipeline.errors import UserError
from pipeline.models.loading import GeneratorModels
from pipeline.referees.blip2 import Referee, RefereeLosses, TextBatch

# Debug hook for fault tests: "prompt_id:iteration" makes that prompt's latents NaN at that
# iteration on every attempt; "prompt_id:iteration:attempts" only on its first `attempts` attempts.
INJECT_NAN_ENV = "REFEREE_SYNTH_INJECT_NAN"
# Debug hook for the out-of-memory fallback: "R" makes every referee pass over more than R view
# rows raise torch.cuda.OutOfMemoryError (as a GPU too small for them would), on any device.
INJECT_OOM_ENV = "REFEREE_SYNTH_INJECT_OOM"

log = logging.getLogger(__name__)


@dataclass
class SampleRequest:
    prompt: str
    prompt_id: str
    sample_index: int
    seed: int
    category: str | None = None  # picks the zoo referees that judge it (zoo.referees[].categories)


@dataclass
class SampleResult:
    request: SampleRequest
    image: torch.Tensor | None  # 3xHxW float32 in [0, 1] on CPU; None when the sample failed
    itm_score: float | None  # referee's match probability for the final, un-augmented image (None: not judged)
    final_losses: dict[str, float]  # {"itm", "caption", "total"} of that image
    iterations: int
    seed: int  # seed actually used (changes after a restart)
    error: str | None
    trace: list[dict] | None
    seconds: float  # the sample's share of its batches' wall time
    restarts: list[str] = field(default_factory=list)  # why each earlier attempt was abandoned
    # With zoo.referees: per active referee {kind, score, loss, weight} of the final image, and why the
    # others gave this sample weight 0. Empty with the paper's single referee.
    referee_scores: dict[str, dict] = field(default_factory=dict)
    referee_skipped: dict[str, str] = field(default_factory=dict)
    # With monitor.enabled (pipeline/engine/monitor.py); None / empty otherwise.
    exit_reason: str | None = None  # completed | early_exit | failed
    monitor_trace: list[dict[str, float]] = field(default_factory=list)  # {iteration, score} per check
    best: MonitorBest | None = None  # monitor.best_iterate: the best-scored checked iterate
    monitor_seconds: float = 0.0  # of `seconds`, its share of the checks' decoding and scoring


def sample_seed(run_seed: int, prompt_id: str, sample_index: int) -> int:
    """Default seed of a (prompt, sample): stable across processes and machines (SHA-256)."""
    return stable_seed("sample", run_seed, prompt_id, sample_index)


def restart_seed(seed: int, attempt: int) -> int:
    """The seed of a restarted sample, derived from the seed that failed."""
    return stable_seed("restart", seed, attempt)


def learning_rate(ocfg: OptimConfig, iteration: int) -> float:
    """Linear warm-up to lr_start over ``warmup`` iterations, then cosine lr_start -> lr_end."""
    if iteration < ocfg.warmup:
        return ocfg.lr_start * (iteration + 1) / ocfg.warmup
    return cosine_schedule(ocfg.lr_start, ocfg.lr_end, iteration - ocfg.warmup, ocfg.iterations - ocfg.warmup)


class LatentEma:
    """EMA of the latents. A restart copies the EMA into z: z never aliases the EMA's storage."""

    def __init__(self, z: torch.Tensor, decay: float) -> None:
        self.decay = decay
        self.value = z.detach().clone()

    @torch.no_grad()
    def update(self, z: torch.Tensor) -> None:
        self.value.mul_(self.decay).add_(z.detach(), alpha=1.0 - self.decay)

    @torch.no_grad()
    def restart(self, z: torch.Tensor) -> None:
        z.copy_(self.value)


def run_in_batches(
    requests: Sequence[SampleRequest],
    size: int,
    run_batch: Callable[[Sequence[SampleRequest]], list[SampleResult]],
    progress: Callable[[int], None] | None,
) -> list[SampleResult]:
    """``run_batch`` on consecutive batches of ``size``; results in request order, progress after each."""
    results: list[SampleResult] = []
    for start in range(0, len(requests), size):
        batch = requests[start : start + size]
        results.extend(run_batch(batch))
        if progress is not None:
            progress(len(batch))
    return results


def parse_nan_injection(value: str | None) -> tuple[str, int, int | None] | None:
    """``prompt_id:iteration[:attempts]`` -> (prompt_id, iteration, attempts or None = always)."""
    if not value:
        return None
    head, _, last = value.rpartition(":")
    mid_head, _, mid = head.rpartition(":")
    if mid_head and mid.isdigit() and last.isdigit():
        return mid_head, int(mid), int(last)
    if head and last.isdigit():
        return head, int(last), None
    raise ValueError(f"{INJECT_NAN_ENV} must be prompt_id:iteration[:attempts], got {value!r}")


@dataclass
class _Slot:
    """One sample of a batch through its attempts."""

    request: SampleRequest
    seed: int
    attempt: int = 0
    restarts: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Outcome:
    """What one optimisation of a batch gives per sample."""

    images: torch.Tensor | None
    losses: RefereeLosses | None
    errors: list[str | None]
    iterations: list[int]
    traces: list[list[dict]]
    zoo_scores: list[dict[str, dict]] | None = None  # with zoo.referees: per sample, per active referee
    zoo_skipped: list[dict[str, str]] | None = None


class _Batch:
    """Mutable state of one optimisation: latents, optimiser, EMA, frozen (failed) samples.

    Which samples failed, where and why lives on the device (``alive``, ``fail_iteration``, ``fail_what``):
    a step freezes a failing sample there without a host sync. The host's ``errors`` / ``stopped_at`` are
    read from it by ``read_failures`` (every engine.check_every iterations, with a trace, and at the end)."""

    def __init__(self, z: torch.Tensor, ocfg: OptimConfig) -> None:
        self.z = z.requires_grad_(True)
        self.opt = _make_optimizer(z, ocfg)
        self.ema = LatentEma(z, ocfg.ema_decay)
        n, dev = z.shape[0], z.device
        self.errors: list[str | None] = [None] * n
        self.stopped_at = [0] * n
        self.alive_rows = torch.ones(n, dtype=torch.bool, device=dev)
        self.fail_iteration = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.fail_what = torch.zeros(n, dtype=torch.long, device=dev)
        self.what: list[str] = []  # names of the checked values; fail_what indexes it
        self._what_base: dict[tuple[str, ...], int] = {}

    def what_base(self, names: tuple[str, ...]) -> int:
        """Index in ``what`` of the first of these names (registered together, in order)."""
        if names not in self._what_base:
            self._what_base[names] = len(self.what)
            self.what.extend(names)
        return self._what_base[names]

    @torch.no_grad()
    def freeze(self, rows: torch.Tensor, what: torch.Tensor, iteration: int) -> None:
        """Stop the samples flagged in ``rows`` ([B] bool, device) that are still alive: record where and why,
        and zero their latents, EMA and optimiser state so they stay finite. No host sync."""
        new = rows & self.alive_rows
        self.alive_rows &= ~new
        self.fail_iteration = torch.where(new, iteration, self.fail_iteration)
        self.fail_what = torch.where(new, what, self.fail_what)
        mask = new.view(-1, *([1] * (self.z.dim() - 1)))
        self.z.masked_fill_(mask, 0.0)
        self.ema.value.masked_fill_(mask, 0.0)
        for state in self.opt.state.values():
            for t in state.values():
                if torch.is_tensor(t) and t.shape == self.z.shape:
                    t.masked_fill_(mask, 0.0)

    def read_failures(self) -> None:
        """Bring the device's failure record to ``errors`` / ``stopped_at`` (one device sync)."""
        its, whats = torch.stack([self.fail_iteration, self.fail_what]).tolist()
        for b, (it, w) in enumerate(zip(its, whats)):
            if it >= 0 and self.errors[b] is None:
                self.errors[b] = f"non-finite {self.what[w].replace('_', ' ')} at iteration {it}"
                self.stopped_at[b] = it

    def alive(self) -> torch.Tensor:
        return self.alive_rows


def _make_optimizer(z: torch.Tensor, ocfg: OptimConfig) -> torch.optim.Optimizer:
    # Both are elementwise (weight decay is L2 on each element): no state is shared across samples.
    if ocfg.optimizer == "adam":
        return torch.optim.Adam([z], lr=ocfg.lr_start, betas=tuple(ocfg.betas), weight_decay=ocfg.weight_decay)
    return torch.optim.SGD([z], lr=ocfg.lr_start, momentum=ocfg.momentum, weight_decay=ocfg.weight_decay)


def _nonfinite(x: torch.Tensor) -> torch.Tensor:
    """[B] bool: rows holding a NaN or an infinity (stays on the device)."""
    return ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)


class InversionEngine:
    def __init__(self, models: GeneratorModels, cfg: Config) -> None:
        self.models = models
        self.cfg = cfg
        self.device = models.device
        self.referee = Referee(models, cfg.referee)
        self.sds = SdsGuidance(models, cfg.sds)
        self.augmenter = ViewAugmenter(cfg.augment, self.referee.image_size).to(self.device)
        self.zoo = RefereeZoo(cfg, models, self.referee) if cfg.zoo.referees else None
        self._decode_fn = models.vae.decode
        self.view_chunk = cfg.engine.view_chunk  # views per referee pass now; the OOM fallback lowers it
        self.oom_fallbacks: list[dict] = []  # one record per halving (iteration, old and new chunk)
        self._oom_rows: int | None = None
        # monitor.enabled: scores a batch of current images (the caller's scorer); None = no monitoring
        self.monitor_score: MonitorFn | None = None
        if self.device.type == "cuda" and cfg.engine.channels_last:
            models.vae.to(memory_format=torch.channels_last)
        self.chunk_plan: ChunkPlan | None = None
        if cfg.engine.auto_view_chunk and self.device.type == "cuda":
            self._plan_chunk()
        self.cast_weights = cfg.engine.cast_weights == "bf16"
        if self.cast_weights:
            self._cast_weights()
        if cfg.engine.compile:
            self._compile()

    def _plan_chunk(self) -> None:
        """engine.auto_view_chunk: the view chunk from the device's free memory now (pipeline/engine/gpu_plan.py)."""
        ec, ac = self.cfg.engine, self.cfg.augment
        free, _ = torch.cuda.mem_get_info(self.device)
        copies = 0.0 if ec.cast_weights == "bf16" else ec.memory_autocast_copies_gib
        self.chunk_plan = plan_view_chunk(free / 2**30, ec.batch_size, ac.num_views, ac.top_k, ec.memory_per_view_gib,
                                          ec.memory_per_image_gib, copies, ec.memory_headroom_gib)
        self.view_chunk = self.chunk_plan.view_chunk
        log.info("engine.auto_view_chunk: %s", self.chunk_plan.describe())

    def _cast_weights(self) -> None:
        """engine.cast_weights bf16: the frozen referee, caption head, UNet and VAE store bf16 weights (once: the
        models are shared); every pass over them then runs under bf16 autocast, the final ones included."""
        if not isinstance(self._autocast(), torch.autocast) or self._autocast().fast_dtype != torch.bfloat16:
            raise UserError("engine.cast_weights: bf16 needs bf16 autocast (engine.autocast: bf16, or auto on CUDA)")
        if self.zoo is not None or self.cfg.monitor.enabled:
            raise UserError("engine.cast_weights: bf16 is for the paper's referee without monitoring "
                            "(zoo.referees empty, monitor.enabled false)")
        m = self.models
        cast_frozen_weights([m.referee, m.caption_head, m.unet, m.vae], torch.bfloat16)

    def _compile(self) -> None:
        """torch.compile what pays (pipeline/engine/gpu_plan.py): every block of the BLIP-2 ViT (and, with a zoo,
        of every referee's vision tower) on its own with static shapes, the VAE decode, optionally the SDS UNet
        as CUDA graphs. The final pass (``_finish``) runs eager: its shapes differ from the loop's.

        A vision tower's blocks are patched on the shared model once. The CPU tests trace it (backend eager).
        """
        ec = self.cfg.engine
        self._decode_fn = torch.compile(self.models.vae.decode, dynamic=False, backend=ec.compile_backend)
        towers = [self.models.referee.vision_model]
        for ref in self.zoo.referees if self.zoo is not None else []:
            towers += vision_towers(getattr(ref, "model", None))
        for vit in towers:
            compile_blocks(vit, ec.compile_backend)
        if ec.compile_unet:
            self.sds.unet = torch.compile(self.models.unet, mode="reduce-overhead", dynamic=False)

    def _eager(self) -> AbstractContextManager:
        """Compiled functions run eager inside (torch.compiler.set_stance; torch >= 2.6), when engine.compile."""
        stance = getattr(torch.compiler, "set_stance", None)
        return stance("force_eager") if self.cfg.engine.compile and stance is not None else nullcontext()

    # ---- public API -------------------------------------------------------------------------
    def run(
        self, requests: list[SampleRequest], progress: Callable[[int], None] | None = None
    ) -> list[SampleResult]:
        """Invert every request, in batches of ``engine.batch_size``; results in request order.

        ``progress`` is called with the number of samples finished after each batch.
        """
        inject = parse_nan_injection(os.environ.get(INJECT_NAN_ENV))
        oom_rows = os.environ.get(INJECT_OOM_ENV)
        self._oom_rows = int(oom_rows) if oom_rows else None
        if self.cfg.monitor.enabled and self.monitor_score is not None:
            return self._run_monitored(requests, inject, progress)
        return run_in_batches(requests, self.cfg.engine.batch_size, lambda b: self._run_batch(b, inject), progress)

    def stream(self, feed: Callable[[int], list[SampleRequest]]) -> Iterator[SampleResult]:
        """Monitored run with continuous batching (pipeline/engine/continuous.py): ``feed(n)`` gives up to n
        more requests whenever slots are free; results come as samples finish. Scores with
        ``monitor_score`` (set by the caller: the engine knows no scorer)."""
        from pipeline.engine.continuous import ContinuousBatch

        inject = parse_nan_injection(os.environ.get(INJECT_NAN_ENV))
        oom_rows = os.environ.get(INJECT_OOM_ENV)
        self._oom_rows = int(oom_rows) if oom_rows else None
        return ContinuousBatch(self, self.monitor_score).run(feed, inject)

    def _run_monitored(self, requests, inject, progress) -> list[SampleResult]:
        queue = list(requests)

        def feed(n: int) -> list[SampleRequest]:
            taken, queue[:n] = queue[:n], []
            return taken

        by_request = {}
        for result in self.stream(feed):
            by_request[id(result.request)] = result
            if progress is not None:
                progress(1)
        return [by_request[id(r)] for r in requests]

    # ---- batches and restarts ---------------------------------------------------------------
    def _run_batch(self, requests: Sequence[SampleRequest], inject) -> list[SampleResult]:
        slots = [_Slot(r, r.seed) for r in requests]
        results: dict[int, SampleResult] = {}
        pending = list(range(len(slots)))
        while pending:
            t0 = time.perf_counter()
            outcome = self._optimise([slots[i] for i in pending], inject)
            share = (time.perf_counter() - t0) / len(pending)
            retry = []
            for j, i in enumerate(pending):
                slot = slots[i]
                slot.seconds += share
                if outcome.errors[j] is None:
                    results[i] = self._success(slot, outcome, j)
                elif slot.attempt < self.cfg.engine.max_restarts:
                    slot.restarts.append(f"{outcome.errors[j]} (seed {slot.seed})")
                    slot.attempt += 1
                    slot.seed = restart_seed(slot.seed, slot.attempt)
                    retry.append(i)
                else:
                    results[i] = self._failure(slot, outcome, j)
            pending = retry
        return [results[i] for i in range(len(slots))]

    def _success(self, slot: _Slot, outcome: _Outcome, j: int) -> SampleResult:
        assert outcome.images is not None and outcome.losses is not None
        losses = {k: float(getattr(outcome.losses, k)[j]) for k in ("itm", "caption", "total")}
        zoo = {}
        if outcome.zoo_scores is not None and outcome.zoo_skipped is not None:
            # No BLIP-2 referee judged it: no ITM numbers (NaN), the zoo's weighted total stays.
            losses = {k: v for k, v in losses.items() if not math.isnan(v)}
            zoo = dict(referee_scores=outcome.zoo_scores[j], referee_skipped=outcome.zoo_skipped[j])
        return SampleResult(
            request=slot.request, image=outcome.images[j], itm_score=math.exp(-losses.get("itm", math.nan)),
            final_losses=losses, iterations=outcome.iterations[j], seed=slot.seed, error=None,
            trace=outcome.traces[j] if self.cfg.engine.trace else None, seconds=slot.seconds,
            restarts=list(slot.restarts), **zoo,
        )

    def _failure(self, slot: _Slot, outcome: _Outcome, j: int) -> SampleResult:
        tries = slot.attempt + 1
        error = f"{outcome.errors[j]} (seed {slot.seed}); gave up after {tries} attempt{'s' if tries > 1 else ''}"
        return SampleResult(
            request=slot.request, image=None, itm_score=float("nan"), final_losses={},
            iterations=outcome.iterations[j], seed=slot.seed, error=error,
            trace=outcome.traces[j] if self.cfg.engine.trace else None, seconds=slot.seconds,
            restarts=list(slot.restarts),
        )

    # ---- one optimisation ---------------------------------------------------------------------
    def _autocast(self) -> AbstractContextManager:
        return autocast_for(self.cfg.engine.autocast, self.device)

    def _initial_latents(self, seeds: Sequence[int]) -> torch.Tensor:
        lc = self.cfg.latent
        return initial_latents(seeds, (lc.channels, lc.size, lc.size)).to(self.device)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        vae = self.models.vae
        x = self._decode_fn(z.to(vae.dtype) / self.cfg.latent.scale).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def _noise(self, z: torch.Tensor, seeds: Sequence[int], stream: str, iteration: int) -> torch.Tensor:
        draws = [
            torch.randn(z[b].shape, generator=generator(s, stream, iteration, device=z.device), device=z.device)
            for b, s in enumerate(seeds)
        ]
        return torch.stack(draws)

    def _losses_no_grad(self, views: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """Total loss of every view, [B, N], in chunks (for picking the hardest views)."""
        b, n = views.shape[:2]
        flat, rows = views.flatten(0, 1), text.repeat_rows(n)
        out = []
        with torch.no_grad(), self._autocast():
            for c in view_chunks(b * n, self.view_chunk):
                out.append(self._referee_losses(flat[c], rows.select(c)).total)
        return torch.cat(out).view(b, n)

    def _hardest(self, views: torch.Tensor, text: TextBatch) -> torch.Tensor:
        k, n = self.cfg.augment.top_k, views.shape[1]
        if not 0 < k < n:
            return views
        idx = self._losses_no_grad(views.detach(), text).topk(k, dim=1).indices
        return views[torch.arange(views.shape[0], device=views.device)[:, None], idx]

    def _guard_rows(self, rows: int) -> None:
        if self._oom_rows is not None and rows > self._oom_rows:
            raise torch.cuda.OutOfMemoryError(
                f"injected out-of-memory: {rows} view rows > {self._oom_rows} ({INJECT_OOM_ENV})"
            )

    def _referee_losses(self, pixels: torch.Tensor, text: TextBatch) -> RefereeLosses:
        self._guard_rows(pixels.shape[0])
        return self.referee.losses(pixels, text)

    def _smaller_chunk(self, rows: int) -> int | None:
        """Half the views of the current referee chunk, or None when it is one view already."""
        current = self.view_chunk if 0 < self.view_chunk < rows else rows
        return None if current <= 1 else (current + 1) // 2

    def _referee_grad(self, z: torch.Tensor, text, seeds: Sequence[int], iteration: int, once=None):
        """``_referee_grad_once`` (or ``once``, the zoo's pass) with the out-of-memory fallback (halve the
        view chunk, redo)."""
        once = once or self._referee_grad_once
        views = self.zoo.max_views if self.zoo is not None else self.cfg.augment.num_views
        while True:
            try:
                return once(z, text, seeds, iteration)
            except torch.cuda.OutOfMemoryError as err:
                # rows of the largest referee pass: the selection pass sees every view
                smaller = self._smaller_chunk(z.shape[0] * views)
                if not self.cfg.engine.oom_fallback or smaller is None:
                    raise
                reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else "out of memory"
            # Out of the handler: the failed attempt's tensors, held by the traceback, are freed.
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            old = self.view_chunk
            self.view_chunk = smaller
            self.oom_fallbacks.append({"iteration": iteration, "view_chunk_was": old, "view_chunk": smaller})
            log.warning(
                "out of memory in the referee pass at iteration %d (view_chunk %s): retrying with view_chunk %d (%s)",
                iteration, old or "all", smaller, reason,
            )

    def _referee_grad_once(
        self, z: torch.Tensor, text: TextBatch, seeds: Sequence[int], iteration: int
    ) -> tuple[torch.Tensor, RefereeLosses]:
        """d(mean over views of the referee loss)/dz per sample, and the per-sample mean losses.

        The view graph is cut at the views so the referee can run in chunks of views, each chunk
        backpropagated on its own (same sum, less memory); the views' gradient then goes back
        through the augmentations and the VAE decoder in one pass.
        """
        with self._autocast():
            images = self._decode(z)
        views = self._hardest(self.augmenter(images, seeds, iteration), text)
        b, n = views.shape[:2]
        leaf = views.detach().requires_grad_(True)
        rows, owner = text.repeat_rows(n), self._owner(b, n, z.device)
        sums = {k: torch.zeros(b, device=z.device) for k in ("itm", "caption", "total")}
        for c in view_chunks(b * n, self.view_chunk):
            with self._autocast():
                part = self._referee_losses(leaf.flatten(0, 1)[c], rows.select(c))
            (part.total.sum() / n).backward()
            for k in sums:
                sums[k].index_add_(0, owner[c], getattr(part, k).detach().float())
        (g,) = torch.autograd.grad(views, z, grad_outputs=leaf.grad)
        return g.float(), RefereeLosses(**{k: v / n for k, v in sums.items()})

    def _owner(self, b: int, n: int, device: torch.device) -> torch.Tensor:
        """[b * n]: the sample each view row belongs to (built once per shape)."""
        key = (b, n, device)
        cache = self.__dict__.setdefault("_owners", {})
        if key not in cache:
            cache[key] = torch.arange(b, device=device).repeat_interleave(n)
        return cache[key]

    def _zoo_grad_once(self, z: torch.Tensor, text: ZooText, seeds: Sequence[int], iteration: int,
                       g_sds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, ZooLosses]:
        """The zoo's (balanced gradient, raw gradient, losses): each referee on its own views of one decode."""
        assert self.zoo is not None
        with self._autocast():
            images = self._decode(z)
        return self.zoo.grad(z, images, text, seeds, iteration, g_sds, self.cfg.optim.ref_to_sds_ratio,
                             self.view_chunk, self._autocast, self._guard_rows)

    def _inject(self, batch: _Batch, slots: Sequence[_Slot], inject, iteration: int) -> None:
        prompt_id, at, attempts = inject
        for b, slot in enumerate(slots):
            hit = slot.request.prompt_id == prompt_id and at == iteration
            if hit and (attempts is None or slot.attempt < attempts):
                with torch.no_grad():
                    batch.z[b].fill_(float("nan"))

    def _check(self, batch: _Batch, iteration: int, **tensors: torch.Tensor) -> None:
        """Freeze the samples with a non-finite value in any of ``tensors`` (on the device: no sync; the reason
        is the first of ``tensors`` that failed, read by ``_Batch.read_failures``)."""
        flags = torch.stack([_nonfinite(t) for t in tensors.values()], dim=1)
        what = batch.what_base(tuple(tensors)) + flags.to(torch.int32).argmax(dim=1)
        batch.freeze(flags.any(dim=1), what, iteration)

    def _joint_step(self, batch: _Batch, slots, prompts, text, i: int, total: int) -> dict:
        """One referee + SDS iteration of Algorithm 1; returns per-batch trace values."""
        ocfg, seeds, z = self.cfg.optim, [s.seed for s in slots], batch.z
        w = self.sds.weight(i, total)
        g_sds = self.sds.grad(z, prompts, seeds, i, w, self._autocast())
        alive = batch.alive().view(-1, 1, 1, 1)
        if self.zoo is None:
            g_raw, losses = self._referee_grad(z, text, seeds, i)
            g_bal = balance_gradients(torch.nan_to_num(g_raw), g_sds, ocfg.ref_to_sds_ratio)
        else:
            g_bal, g_raw, losses = self._referee_grad(
                z, text, seeds, i, once=lambda *a: self._zoo_grad_once(*a, g_sds=g_sds))
        g_ref = torch.where(alive, g_bal, 0.0)
        lr = learning_rate(ocfg, i)
        for group in batch.opt.param_groups:
            group["lr"] = lr
        z.grad = g_ref + ocfg.noise_std * self._noise(z, seeds, "grad-noise", i)
        batch.opt.step()
        with torch.no_grad():
            z.sub_(ocfg.sds_step * g_sds)
            z.add_(ocfg.noise_std * self._noise(z, seeds, "z-noise", i))
        # A non-finite loss or gradient only touches its own sample's row (nan_to_num above).
        self._check(batch, i, referee_loss=losses.total.view(-1, 1), referee_gradient=g_raw, latents=z)
        batch.ema.update(z)
        if i + 1 in ocfg.ema_restarts:
            batch.ema.restart(z)
        return {"lr": lr, "sds_weight": w, "losses": losses, "g_ref_raw": g_raw, "g_ref": g_ref, "g_sds": g_sds}

    def _tail_step(self, batch: _Batch, slots, prompts, i: int, total: int) -> dict:
        """One SDS-only iteration: z -= sds_step * g_sds + tail_noise_std * noise."""
        ocfg, seeds, z = self.cfg.optim, [s.seed for s in slots], batch.z
        w = self.sds.weight(i, total)
        g_sds = self.sds.grad(z, prompts, seeds, i, w, self._autocast())
        with torch.no_grad():
            z.sub_(ocfg.sds_step * g_sds + ocfg.tail_noise_std * self._noise(z, seeds, "tail-noise", i))
        self._check(batch, i, latents=z)
        return {"lr": ocfg.sds_step, "sds_weight": w, "g_sds": g_sds}

    def _optimise(self, slots: Sequence[_Slot], inject) -> _Outcome:
        ocfg = self.cfg.optim
        prompts = [s.request.prompt for s in slots]
        if self.zoo is None:
            text = self.referee.encode(prompts)
        else:
            text = self.zoo.encode(prompts, [s.request.category for s in slots], self.device)
        batch = _Batch(self._initial_latents([s.seed for s in slots]), ocfg)
        total = ocfg.iterations + ocfg.tail_iterations
        traces: list[list[dict]] = [[] for _ in slots]
        every = self.cfg.engine.check_every
        for i in range(total):
            if inject is not None:
                self._inject(batch, slots, inject, i)
                self._check(batch, i, latents=batch.z)
            if i < ocfg.iterations:
                info = self._joint_step(batch, slots, prompts, text, i, total)
            else:
                info = self._tail_step(batch, slots, prompts, i, total)
            if self.cfg.engine.trace:  # syncs anyway: the record needs the failures as of this iteration
                batch.read_failures()
                _append_trace(traces, info, i, batch.errors)
            elif (i + 1) % every == 0:
                batch.read_failures()
                if all(e is not None for e in batch.errors):
                    break  # every sample failed: their restarts need not wait for the schedule's end
        return self._finish(batch, text, traces, total)

    @torch.no_grad()
    def _finish(self, batch: _Batch, text, traces: list[list[dict]], total: int) -> _Outcome:
        """Decode the final latents and score the un-augmented images with the referee (eager; under autocast
        only with engine.cast_weights, whose bf16 weights need it)."""
        with self._eager():
            return self._finish_eager(batch, text, traces, total)

    def _finish_eager(self, batch: _Batch, text, traces: list[list[dict]], total: int) -> _Outcome:
        final_autocast = self._autocast() if self.cast_weights else nullcontext()
        with final_autocast:
            images = self._decode(batch.z.detach())
        if self.zoo is not None:
            return self._finish_zoo(batch, images, text, traces, total)
        with final_autocast:
            losses = self.referee.losses(self.augmenter.plain(images), text)
        self._check(batch, total, final_referee_loss=losses.total.view(-1, 1), image=images)
        batch.read_failures()
        iterations = [total if e is None else s for e, s in zip(batch.errors, batch.stopped_at)]
        losses = RefereeLosses(losses.itm.float().cpu(), losses.caption.float().cpu(), losses.total.float().cpu())
        return _Outcome(images.float().cpu(), losses, list(batch.errors), iterations, traces)


    def _finish_zoo(self, batch: _Batch, images: torch.Tensor, text: ZooText, traces: list[list[dict]],
                    total: int) -> _Outcome:
        """Every referee's score and loss of the un-augmented images; BLIP-2's ITM/caption as the record's."""
        assert self.zoo is not None
        scores, losses, parts = self.zoo.final(images, text)
        self._check(batch, total, final_referee_loss=losses.total.to(images.device).view(-1, 1), image=images)
        batch.read_failures()
        iterations = [total if e is None else s for e, s in zip(batch.errors, batch.stopped_at)]
        blip2 = next((parts[r.name] for r in self.zoo.referees if r.kind == "blip2" and r.name in parts), {})
        nan = torch.full_like(losses.total, math.nan)
        out = RefereeLosses(blip2.get("itm", nan), blip2.get("caption", nan), losses.total.float().cpu())
        return _Outcome(images.float().cpu(), out, list(batch.errors), iterations, traces, scores, text.skipped)


def vision_towers(model) -> list[torch.nn.Module]:
    """The vision encoders of a zoo referee's model (CLIP: vision_model; OWLv2: owlv2.vision_model)."""
    out = []
    for holder in (model, getattr(model, "owlv2", None)):
        tower = getattr(holder, "vision_model", None)
        if isinstance(tower, torch.nn.Module):
            out.append(tower)
    return out


def _append_trace(traces: list[list[dict]], info: dict, iteration: int, errors: list[str | None]) -> None:
    """Per-sample record of one iteration (only with engine.trace: it syncs with the device)."""
    norms = {k: per_sample_norm(info[k]).tolist() for k in ("g_ref_raw", "g_ref", "g_sds") if k in info}
    losses: RefereeLosses | ZooLosses | None = info.get("losses")
    for b, trace in enumerate(traces):
        if errors[b] is not None:  # frozen after a failure: nothing more to record
            continue
        row = {"iteration": iteration, "phase": "joint" if losses is not None else "tail",
               "lr": info["lr"], "sds_weight": info["sds_weight"]}
        if isinstance(losses, ZooLosses):
            row.update({f"loss_{k}": float(v[b]) for k, v in losses.by_name.items()}, total=float(losses.total[b]))
        elif losses is not None:
            row.update(itm=float(losses.itm[b]), caption=float(losses.caption[b]), total=float(losses.total[b]))
        row.update({f"{k}_norm": v[b] for k, v in norms.items()})
        trace.append(row)
