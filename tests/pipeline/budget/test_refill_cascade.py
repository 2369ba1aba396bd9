"""The cascade's attempt queue (pipeline/budget/refill.py): stages by sample index, hand-over only while short,
and batches of one stage each."""

from __future__ import annotations

import random

from pipeline.budget.refill import AttemptQueue


def _drive(queue: AttemptQueue, sizes: list[int], accept) -> list[tuple[int, list[tuple[int, int]]]]:
    """Run the queue to the end as the shard does: a batch, resolve each attempt, refill; the batches run."""
    batches = []
    while len(queue):
        stage, items = queue.next_stage_batch(sizes)
        batches.append((stage, items))
        for row, k in items:
            queue.resolve(row, accept(row, k, stage))
        queue.refill()
    return batches


def _made(batches) -> dict[int, list[tuple[int, int]]]:
    """Per row: (sample_index, stage) of every attempt, in index order."""
    out: dict[int, list[tuple[int, int]]] = {}
    for stage, items in batches:
        for row, k in items:
            out.setdefault(row, []).append((k, stage))
    return {row: sorted(v) for row, v in out.items()}


def test_an_index_names_its_stage_and_a_prompt_met_in_stage_one_never_reaches_stage_two() -> None:
    # K 2, stage budgets 3 (sampling) then 2 (inversion). Row 0: always accepted; row 1: never; row 2: only by
    # the second stage; row 3: by its third sampling attempt and by the second stage.
    accept = {0: lambda k, s: True, 1: lambda k, s: False, 2: lambda k, s: s == 1, 3: lambda k, s: k == 2 or s == 1}
    queue = AttemptQueue.for_rows([(r, 1) for r in range(4)], 2, 5, [3, 2])
    made = _made(_drive(queue, [4, 2], lambda row, k, s: accept[row](k, s)))
    assert made[0] == [(0, 0), (1, 0)]  # met in stage 1: no inversion
    assert made[1] == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1)]  # every budget spent
    assert made[2] == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1)]  # short by 2 after stage 1: inverts exactly 2
    assert made[3] == [(0, 0), (1, 0), (2, 0), (3, 1)]  # short by 1 after stage 1: inverts exactly 1
    assert [p.accepted for p in queue.prompts] == [2, 0, 2, 2]
    assert [p.short_by for p in queue.prompts] == [0, 2, 0, 0]


def test_a_target_above_the_first_budget_queues_the_second_stage_from_the_start() -> None:
    queue = AttemptQueue.for_rows([(0, 1)], 3, 4, [1, 3])
    assert queue.next_stage_batch([4, 4]) == (0, [(0, 0)])
    assert queue.next_stage_batch([4, 4]) == (1, [(0, 1), (0, 2)])


def test_batches_never_mix_stages_and_a_later_stage_runs_part_filled_only_when_earlier_ones_are_empty() -> None:
    rng = random.Random(0)
    outcomes: dict[tuple[int, int], bool] = {}

    def accept(row: int, k: int, stage: int) -> bool:
        return outcomes.setdefault((row, k), rng.random() < (0.3 if stage == 0 else 0.6))

    sizes = [4, 3]
    rows = [(r, 1) for r in range(9)]
    queue = AttemptQueue.for_rows(rows, 3, 8, [5, 3])
    batches = []
    while len(queue):
        waiting = [len(q) for q in queue._queues]
        stage, items = queue.next_stage_batch(sizes)
        batches.append((stage, items))
        full = [s for s in range(2) if waiting[s] >= sizes[s]]
        assert stage == (full[0] if full else next(s for s in range(2) if waiting[s]))
        assert 0 < len(items) <= sizes[stage]
        assert all(queue.prompts[row].stage_of(k) == stage for row, k in items)  # one stage per batch
        for row, k in items:
            queue.resolve(row, accept(row, k, stage))
        queue.refill()
    made = _made(batches)
    for row, attempts in made.items():
        indices = [k for k, _ in attempts]
        assert indices == list(range(len(indices)))  # indices continue across stages, none twice
        assert all(stage == (0 if k < 5 else 1) for k, stage in attempts)
        accepted = sum(outcomes[(row, k)] for k in indices)
        assert accepted <= 3  # never a surplus
        assert accepted == 3 or len(indices) == 8  # stops at the target or the whole budget
        if any(stage == 1 for _, stage in attempts):  # handed on only after stage 1 fell short
            assert sum(outcomes[(row, k)] for k in range(5)) < 3
    # The same results give the same batches on a rerun.
    again = AttemptQueue.for_rows(rows, 3, 8, [5, 3])
    assert _drive(again, sizes, lambda row, k, s: outcomes[(row, k)]) == batches


def test_a_single_generator_queue_is_the_one_stage_it_always_was() -> None:
    queue = AttemptQueue.for_rows([(0, 2), (1, 3)], 0, 8)
    assert queue.next_stage_batch([4]) == (0, [(0, 0), (0, 1), (1, 0), (1, 1)])
    assert queue.next_batch(4) == [(1, 2)] and len(queue) == 0
