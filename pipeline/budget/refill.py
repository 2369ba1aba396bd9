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
    issued: int = 0
    resolved: int = 0
    accepted: int = 0

    @property
    def outstanding(self) -> int:
        return self.issued - self.resolved

    @property
    def short_by(self) -> int:
        """How many accepted samples it lacks at the end (0 when fixed or reached)."""
        return max(0, self.target - self.accepted) if self.target else 0


class AttemptQueue:
    """The attempts of one shard: ``next_batch`` -> run and score -> ``resolve`` each -> ``refill``."""

    def __init__(self, prompts: list[PromptAttempts]) -> None:
        self.prompts = prompts
        self._by_row = {p.row_in_shard: p for p in prompts}
        self._queue: deque[tuple[int, int]] = deque()
        for p in prompts:
            self._issue(p, min(p.target, p.limit) if p.target else p.limit)

    @classmethod
    def for_rows(cls, rows: list[tuple[int, int]], target: int, max_samples: int) -> AttemptQueue:
        """``rows``: (row_in_shard, num_samples) of the valid rows, in row order."""
        if target:
            return cls([PromptAttempts(i, limit=max_samples, target=target) for i, _ in rows])
        return cls([PromptAttempts(i, limit=n) for i, n in rows])

    def _issue(self, p: PromptAttempts, n: int) -> None:
        for _ in range(n):
            self._queue.append((p.row_in_shard, p.issued))
            p.issued += 1

    def next_batch(self, size: int) -> list[tuple[int, int]]:
        """Up to ``size`` (row_in_shard, sample_index) pairs from the head of the queue."""
        return [self._queue.popleft() for _ in range(min(size, len(self._queue)))]

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
        return len(self._queue)
