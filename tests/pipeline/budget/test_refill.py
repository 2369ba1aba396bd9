"""The attempt queue: fixed K keeps the old order; a target refills short prompts, never past K or M."""

from __future__ import annotations

from pipeline.budget.refill import AttemptQueue


def _drain(queue: AttemptQueue, size: int, accept) -> list[list[tuple[int, int]]]:
    batches = []
    while len(queue):
        batch = queue.next_batch(size)
        for row, k in batch:
            queue.resolve(row, accept(row, k))
        queue.refill()
        batches.append(batch)
    return batches


def test_fixed_k_is_row_order_then_sample_order_in_batches() -> None:
    q = AttemptQueue.for_rows([(0, 2), (2, 3)], target=0, max_samples=9)
    assert _drain(q, 4, lambda r, k: False) == [[(0, 0), (0, 1), (2, 0), (2, 1)], [(2, 2)]]


def test_everything_accepted_makes_exactly_the_target() -> None:
    q = AttemptQueue.for_rows([(i, 1) for i in range(3)], target=2, max_samples=5)
    batches = _drain(q, 4, lambda r, k: True)
    assert sorted(a for b in batches for a in b) == [(i, k) for i in range(3) for k in range(2)]
    assert [(p.accepted, p.issued, p.short_by) for p in q.prompts] == [(2, 2, 0)] * 3


def test_nothing_accepted_stops_at_max_and_refills_share_batches() -> None:
    q = AttemptQueue.for_rows([(0, 1), (1, 1), (2, 1)], target=2, max_samples=5)
    batches = _drain(q, 4, lambda r, k: False)
    assert [(p.issued, p.short_by) for p in q.prompts] == [(5, 2)] * 3
    assert batches[1] == [(2, 0), (2, 1), (0, 2), (0, 3)]  # row 2's first attempts, then refills in row order
    assert all(len(b) == 4 for b in batches[:-1])  # full batches until the tail


def test_outstanding_attempts_count_towards_the_target() -> None:
    """A prompt whose first attempt is accepted while its second still waits gets no refill yet."""
    q = AttemptQueue.for_rows([(0, 1), (1, 1)], target=2, max_samples=5)
    first = q.next_batch(3)  # (0,0) (0,1) (1,0)
    for row, _k in first:
        q.resolve(row, True)
    assert q.refill() == 0  # row 1: 1 accepted + 1 outstanding = the target
    assert q.next_batch(9) == [(1, 1)]
    q.resolve(1, False)
    assert q.refill() == 1 and q.next_batch(9) == [(1, 2)]


def test_mixed_outcomes_never_exceed_target() -> None:
    q = AttemptQueue.for_rows([(i, 1) for i in range(5)], target=3, max_samples=9)
    _drain(q, 4, lambda r, k: (r * 7 + k * 3) % 4 != 0)
    for p in q.prompts:
        assert p.accepted == 3 or p.issued == 9
        assert p.accepted <= 3 and p.issued <= 9
