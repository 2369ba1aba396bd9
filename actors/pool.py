"""Dynamic scheduling of shards over a pool of ``ShardWorker`` actors, with bounded retries.

A shard whose actor dies or raises goes back to the queue and is handed to a different actor
(a dead actor is replaced by a fresh one). After ``max_retries`` retries the shard is reported
failed; its files were never marked complete, so a rerun picks it up.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError
from ray.util.queue import Empty, Queue

from pipeline.shards import ShardSpec

ProgressFn = Callable[[dict[str, int]], None]


@dataclass
class PoolResult:
    stats: dict[int, dict[str, Any]] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)  # shard -> last error
    retries: int = 0


@dataclass
class _Slot:
    actor: Any
    ident: int


class ShardPool:
    def __init__(self, make_actor: Callable[[Queue], Any], size: int, max_retries: int) -> None:
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._make_actor = make_actor
        self._next_ident = 0
        self.slots = [self._new_slot() for _ in range(size)]
        self.max_retries = max_retries

    def _new_slot(self) -> _Slot:
        self._next_ident += 1
        return _Slot(self._make_actor(self.queue), self._next_ident)

    def wait_ready(self) -> None:
        """Surface a model-loading error from the actors' constructors before any shard starts."""
        ray.get([s.actor.ready.remote() for s in self.slots])

    def shutdown(self) -> None:
        for s in self.slots:
            _kill_quietly(s.actor)
        _kill_quietly(self.queue.actor)

    def run(self, specs: list[ShardSpec], on_progress: ProgressFn, on_done: Callable[[dict], None]) -> PoolResult:
        result = PoolResult()
        pending = deque(specs)
        attempts: dict[int, int] = {}
        tried_by: dict[int, set[int]] = {}
        partial: dict[tuple[int, int], dict[str, int]] = {}
        in_flight: dict[Any, tuple[int, ShardSpec, int]] = {}
        idle = list(range(len(self.slots)))
        while pending or in_flight:
            while idle and pending:
                slot_i = idle.pop(0)
                spec = _pick(pending, tried_by, self.slots[slot_i].ident)
                attempt = attempts.get(spec.shard, 0)
                ref = self.slots[slot_i].actor.process.remote(spec, attempt)
                in_flight[ref] = (slot_i, spec, attempt)
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
            self._drain(partial, on_progress)
            for ref in ready:
                slot_i, spec, attempt = in_flight.pop(ref)
                try:
                    stats = ray.get(ref)
                except RayError as err:  # the task raised, or its actor died / became unreachable
                    self._drain(partial, on_progress)
                    _undo_progress(partial.pop((spec.shard, attempt), {}), on_progress)
                    tried_by.setdefault(spec.shard, set()).add(self.slots[slot_i].ident)
                    if not isinstance(err, RayTaskError):
                        _kill_quietly(self.slots[slot_i].actor)
                        self.slots[slot_i] = self._new_slot()  # the process is gone or lost: a fresh actor
                    attempts[spec.shard] = attempt + 1
                    if attempt + 1 <= self.max_retries:
                        result.retries += 1
                        pending.appendleft(spec)
                    else:
                        result.failed[spec.shard] = _one_line(err)
                    idle.append(slot_i)
                    continue
                partial.pop((spec.shard, attempt), None)
                result.stats[spec.shard] = stats
                on_done(stats)
                idle.append(slot_i)
        self._drain(partial, on_progress)
        return result

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
