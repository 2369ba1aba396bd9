"""Which (prompt, sample) attempts a shard makes, and in which batches: fixed K or accept-until-target.

Fixed (no target): every prompt gets its ``num_samples`` attempts, queued in row order, and the
queue is cut into batches of ``engine.batch_size``: exactly the order the shard always used.

Accept-until-target (``job.target_accepted`` K, ``job.max_samples_per_prompt`` M): in-shard refill.
Each prompt starts with min(K, M) attempts in the queue. After each batch is scored, every prompt
(in row order) whose accepted + still-outstanding attempts fall short of K, and that has issued
fewer than M, queues that many more attempts with the next sample indices. Batches are always
taken from the head of the queue, so a prompt's next attempts share the optimisation batch with
other prompts' attempts and the batch stays full until the shard's tail.

Counting outstanding attempts as if they would be accepted means a prompt never gets more than K
accepted samples (nothing is wasted on a surplus), at the cost of a refill waiting for its batch
to be scored. Everything here depends only on the shard's rows and the accept/reject results, which
depend only on the batches (images are bit-identical for the same batch composition): the same
shard gives the same attempts, batches and records on every actor and on every rerun.

A cascade (``engine.generator: cascade``, budgets b1, b2, ... per stage): a prompt's sample indices
[0, b1) belong to stage 1, [b1, b1 + b2) to stage 2, and so on, so an index names its stage (and its key
and seed stay the same on a rerun). Refill is the same rule with M = b1 + b2 + ...: a prompt reaches
stage 2 only once all b1 stage-1 attempts are issued and it is still short counting its outstanding
attempts as accepted, so a prompt that meets its target in stage 1 never reaches stage 2. Each stage has
its own queue and batches only its own attempts (sampling and inversion never share a batch):
``next_stage_batch`` runs the first stage with a full batch, else the first stage with any work, so a
later (costlier) stage runs a part-filled batch only when no earlier stage's attempt waits.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass
class PromptAttempts:
    """One prompt row's attempts in a shard."""

    row_in_shard: int
    limit: int  # attempts at most (num_samples when fixed, M with a target)
    target: int = 0  # accepted samples wanted; 0: fixed, make exactly `limit`
    stage_ends: tuple[int, ...] = ()  # a cascade: each stage's last sample index + 1 (its budgets summed)
    issued: int = 0
    resolved: int = 0
    accepted: int = 0

    @property
    def outstanding(self) -> int:
        return self.issued - self.resolved

    def stage_of(self, sample_index: int) -> int:
        """The cascade stage (0-based) a sample index belongs to; 0 without a cascade."""
        return next((s for s, end in enumerate(self.stage_ends) if sample_index < end), 0)

    @property
    def short_by(self) -> int:
        """How many accepted samples it lacks at the end (0 when fixed or reached)."""
        return max(0, self.target - self.accepted) if self.target else 0


class AttemptQueue:
    """The attempts of one shard: ``next_batch`` -> run and score -> ``resolve`` each -> ``refill``."""

    def __init__(self, prompts: list[PromptAttempts], stages: int = 1) -> None:
        self.prompts = prompts
        self._by_row = {p.row_in_shard: p for p in prompts}
        self._queues: list[deque[tuple[int, int]]] = [deque() for _ in range(stages)]
        for p in prompts:
            self._issue(p, min(p.target, p.limit) if p.target else p.limit)

    @classmethod
    def for_rows(cls, rows: list[tuple[int, int]], target: int, max_samples: int,
                 stage_budgets: list[int] | list[list[int]] | None = None) -> AttemptQueue:
        """``rows``: (row_in_shard, num_samples) of the valid rows, in row order. ``stage_budgets``: a
        cascade's attempts per stage, the same for every row or one list per row (then ``max_samples`` is
        unused: a row's limit is its budgets summed)."""
        if stage_budgets:
            per_row = stage_budgets if isinstance(stage_budgets[0], list) else [stage_budgets] * len(rows)
            prompts = []
            for (i, _), budgets in zip(rows, per_row):
                ends = tuple(sum(budgets[: s + 1]) for s in range(len(budgets)))
                prompts.append(PromptAttempts(i, limit=ends[-1], target=target, stage_ends=ends))
            return cls(prompts, stages=len(per_row[0]) if per_row else 1)
        if target:
            return cls([PromptAttempts(i, limit=max_samples, target=target) for i, _ in rows])
        return cls([PromptAttempts(i, limit=n) for i, n in rows])

    def _issue(self, p: PromptAttempts, n: int) -> None:
        for _ in range(n):
            self._queues[p.stage_of(p.issued)].append((p.row_in_shard, p.issued))
            p.issued += 1

    def next_batch(self, size: int) -> list[tuple[int, int]]:
        """Up to ``size`` (row_in_shard, sample_index) pairs from the head of the queue (one stage)."""
        return self._take(0, size)

    def next_stage_batch(self, sizes: list[int]) -> tuple[int, list[tuple[int, int]]]:
        """(stage, up to ``sizes[stage]`` attempts of that stage): the first stage with a full batch waiting,
        else the first stage with any attempt waiting."""
        full = [s for s, q in enumerate(self._queues) if len(q) >= sizes[s]]
        stage = full[0] if full else next(s for s, q in enumerate(self._queues) if q)
        return stage, self._take(stage, sizes[stage])

    def _take(self, stage: int, size: int) -> list[tuple[int, int]]:
        q = self._queues[stage]
        return [q.popleft() for _ in range(min(size, len(q)))]

    def resolve(self, row_in_shard: int, accepted: bool) -> None:
        """One attempt of this row finished (accepted, or rejected/failed)."""
        p = self._by_row[row_in_shard]
        p.resolved += 1
        p.accepted += int(accepted)

    def refill(self) -> int:
        """Queue the next attempts of the prompts still short of their target; returns how many."""
        added = 0
        for p in self.prompts:
            if not p.target:
                continue
            n = min(p.target - p.accepted - p.outstanding, p.limit - p.issued)
            if n > 0:
                self._issue(p, n)
                added += n
        return added

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues)
