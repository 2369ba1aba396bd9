"""Dynamic scheduling of shards over a pool of ``ShardWorker`` actors, with bounded retries.

Shards go to each actor as soon as it is ready (an autoscaler may take minutes to bring the GPU node
an actor waits for); the pool never waits for all of them. If no actor is ready for
``ready_timeout_s``, ``run`` raises ``NoActorReady``. A shard whose actor dies or raises goes back to
the queue and is handed to a different actor (a dead actor is replaced by a fresh one). After
``max_retries`` retries the shard is reported failed; its files were never marked complete, so a
rerun picks it up.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.util.queue import Empty, Queue

from pipeline.io.shards import ShardSpec

ProgressFn = Callable[[dict[str, int]], None]
# (event, details): "ready" when an actor is ready ({"slot", "ready", "size", "seconds", "info"});
# "fewer" once, when the ready timeout passes with some but not all actors ready ({"ready", "size"}).
EventFn = Callable[[str, dict[str, Any]], None]


class NoActorReady(RuntimeError):
    """No actor became ready within the timeout (its resources never appeared)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no actor ready after {seconds:.0f} s")
        self.seconds = seconds


class ActorStartError(RuntimeError):
    """An actor's constructor failed (e.g. a model could not load): every actor would fail alike."""

    def __init__(self, cause: RayActorError) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass
class PoolResult:
    stats: dict[int, dict[str, Any]] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)  # shard -> last error
    retries: int = 0


@dataclass
class _Slot:
    actor: Any
    ident: int
    ready_ref: Any | None  # the pending ready() call; None once the actor is ready


@dataclass
class _RunState:
    pending: deque[ShardSpec]
    idle: list[int] = field(default_factory=list)
    in_flight: dict[Any, tuple[int, ShardSpec, int]] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)
    tried_by: dict[int, set[int]] = field(default_factory=dict)
    partial: dict[tuple[int, int], dict[str, int]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    none_ready_since: float | None = field(default_factory=time.monotonic)
    warned_fewer: bool = False


class ShardPool:
    def __init__(
        self, make_actor: Callable[[Queue], Any], size: int, max_retries: int,
        ready_timeout_s: float = float("inf"), on_event: EventFn | None = None,
    ) -> None:
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._make_actor = make_actor
        self._next_ident = 0
        self.slots = [self._new_slot() for _ in range(size)]
        self.max_retries = max_retries
        self.ready_timeout_s = ready_timeout_s
        self._notify = on_event or (lambda event, details: None)

    def _new_slot(self) -> _Slot:
        self._next_ident += 1
        actor = self._make_actor(self.queue)
        return _Slot(actor, self._next_ident, actor.ready.remote())

    def shutdown(self) -> None:
        for s in self.slots:
            _kill_quietly(s.actor)
        _kill_quietly(self.queue.actor)

    def run(self, specs: list[ShardSpec], on_progress: ProgressFn, on_done: Callable[[dict], None],
            check: Callable[[], None] | None = None) -> PoolResult:
        """``check``: called every turn (e.g. the driver's lease); what it raises stops the run."""
        result = PoolResult()
        st = _RunState(pending=deque(specs))
        while st.pending or st.in_flight:
            if check is not None:
                check()
            self._dispatch(st)
            starting = {s.ready_ref: i for i, s in enumerate(self.slots) if s.ready_ref is not None}
            refs = list(st.in_flight) + list(starting)
            done, rest = ray.wait(refs, num_returns=1, timeout=0.5)
            if done and rest:  # collect everything else that is done too: fewer loop turns at scale
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                done += more
            self._drain(st.partial, on_progress)
            for ref in done:
                if ref in starting:
                    self._on_ready(starting[ref], st)
                else:
                    self._on_result(ref, st, result, on_progress, on_done)
            self._check_readiness(st)
        self._drain(st.partial, on_progress)
        return result

    def _dispatch(self, st: _RunState) -> None:
        while st.idle and st.pending:
            slot_i = st.idle.pop(0)
            spec = _pick(st.pending, st.tried_by, self.slots[slot_i].ident)
            attempt = st.attempts.get(spec.shard, 0)
            ref = self.slots[slot_i].actor.process.remote(spec, attempt)
            st.in_flight[ref] = (slot_i, spec, attempt)

    def _on_ready(self, slot_i: int, st: _RunState) -> None:
        slot = self.slots[slot_i]
        try:
            info = ray.get(slot.ready_ref)
        except RayActorError as err:
            raise ActorStartError(err) from None
        slot.ready_ref = None
        st.idle.append(slot_i)
        ready = sum(s.ready_ref is None for s in self.slots)
        self._notify("ready", {"slot": slot_i, "ready": ready, "size": len(self.slots),
                               "seconds": time.monotonic() - st.started, "info": info})

    def _on_result(
        self, ref: Any, st: _RunState, result: PoolResult, on_progress: ProgressFn, on_done: Callable[[dict], None]
    ) -> None:
        slot_i, spec, attempt = st.in_flight.pop(ref)
        try:
            stats = ray.get(ref)
        except RayError as err:  # the task raised, or its actor died / became unreachable
            self._drain(st.partial, on_progress)
            _undo_progress(st.partial.pop((spec.shard, attempt), {}), on_progress)
            st.tried_by.setdefault(spec.shard, set()).add(self.slots[slot_i].ident)
            st.attempts[spec.shard] = attempt + 1
            if attempt + 1 <= self.max_retries:
                result.retries += 1
                st.pending.appendleft(spec)
            else:
                result.failed[spec.shard] = _one_line(err)
            if isinstance(err, RayTaskError):
                st.idle.append(slot_i)
            else:  # the process is gone or lost: a fresh actor, used once it is ready
                _kill_quietly(self.slots[slot_i].actor)
                self.slots[slot_i] = self._new_slot()
            return
        st.partial.pop((spec.shard, attempt), None)
        result.stats[spec.shard] = stats
        on_done(stats)
        st.idle.append(slot_i)

    def _check_readiness(self, st: _RunState) -> None:
        """Give up when no actor has been ready for the timeout; warn once when only some are."""
        now = time.monotonic()
        ready = sum(s.ready_ref is None for s in self.slots)
        if ready:
            st.none_ready_since = None
        elif st.none_ready_since is None:
            st.none_ready_since = now
        if st.none_ready_since is not None and st.pending and now - st.none_ready_since > self.ready_timeout_s:
            raise NoActorReady(now - st.none_ready_since)
        if not st.warned_fewer and 0 < ready < len(self.slots) and now - st.started > self.ready_timeout_s:
            st.warned_fewer = True
            self._notify("fewer", {"ready": ready, "size": len(self.slots)})

    def _drain(self, partial: dict[tuple[int, int], dict[str, int]], on_progress: ProgressFn) -> None:
        while True:
            try:
                shard, attempt, counts = self.queue.get_nowait()
            except Empty:
                return
            except RayError:
                return  # progress is best effort: a busy or lost queue actor never fails the run
            acc = partial.setdefault((shard, attempt), {})
            for k, v in counts.items():
                acc[k] = acc.get(k, 0) + v
            on_progress(counts)


def missing_resources(request: dict[str, float]) -> str:
    """One line: what each actor asks for, what the cluster has, and which resources fall short."""
    total, free = ray.cluster_resources(), ray.available_resources()
    asks = {k: v for k, v in request.items() if v > 0}
    missing = [k for k, v in asks.items() if free.get(k, 0.0) < v]
    have = ", ".join(f"{k} {total.get(k, 0.0):g} ({free.get(k, 0.0):g} free)" for k in asks)
    why = f"missing: {', '.join(missing)}" if missing else "no resource is short (actors still starting?)"
    return f"each actor asks for {', '.join(f'{k} {v:g}' for k, v in asks.items())}; the cluster has {have}; {why}"


def _pick(pending: deque[ShardSpec], tried_by: dict[int, set[int]], ident: int) -> ShardSpec:
    """The first pending shard this actor has not failed before (else the first one)."""
    for i, spec in enumerate(pending):
        if ident not in tried_by.get(spec.shard, set()):
            del pending[i]
            return spec
    return pending.popleft()


def _kill_quietly(actor: Any) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except (RayError, ValueError):
        pass  # already gone


def _undo_progress(counts: dict[str, int], on_progress: ProgressFn) -> None:
    if counts:
        on_progress({k: -v for k, v in counts.items()})


def _one_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    lines = [t for t in text if t.strip()]
    return (lines[-1] if lines else type(err).__name__)[:300]
