"""The finetune's data: rewards as GORS reads them, the rank split, resumable positions."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import UserError
from pipeline.finetune.data import MixedStream, RunStream, inventory, parse_run, reward_of
from tests.pipeline.finetune.runs import write_run


def _captions(stream: RunStream, n: int) -> list[str]:
    return [stream.next()[3] for _ in range(n)]


def test_one_process_and_two_ranks_share_the_global_order(tmp_path) -> None:
    """Fewer shards than ranks: rank r takes every 2nd sample of the one-process order, from position r."""
    write_run(tmp_path / "run", shards=1, per_shard=6, size=8)
    inv = inventory(str(tmp_path / "run"))
    one = _captions(RunStream(inv, 5, 0, 1, 4), 12)  # two epochs
    ranks = [_captions(RunStream(inv, 5, r, 2, 4), 6) for r in range(2)]
    assert ranks[0] == one[0::2] and ranks[1] == one[1::2]
    assert sorted(one[:6]) == sorted(one[6:]) and one[:6] != one[6:]  # every sample once per epoch, reshuffled


def test_enough_shards_go_whole_to_ranks_and_each_epoch_covers_every_sample(tmp_path) -> None:
    made = write_run(tmp_path / "run", shards=4, per_shard=2, size=8)
    inv = inventory(str(tmp_path / "run"))
    streams = [RunStream(inv, 0, r, 2, 4) for r in range(2)]
    assert all(s.by_shard for s in streams)
    got = [s.next()[1]["row"] for s in streams for _ in range(4)]
    assert sorted(got) == list(range(len(made)))


def test_a_resumed_stream_continues_where_the_position_says(tmp_path) -> None:
    write_run(tmp_path / "run", shards=2, per_shard=3, size=8)
    inv = inventory(str(tmp_path / "run"))
    first = MixedStream([(inv, 1.0)], 3, 0, 1, 8, 4)
    first.batch(0, 2)
    first.batch(1, 2)
    state = json.loads(json.dumps(first.state()))
    expected = first.batch(2, 4)[1]
    resumed = MixedStream([(inv, 1.0)], 3, 0, 1, 8, 4, state)
    assert resumed.batch(2, 4)[1] == expected  # crosses the epoch boundary too


def test_rewards_are_the_benchmarks_written_answers() -> None:
    assert reward_of({"scorer": "blip_vqa", "vqa_score": 0.123456}) == pytest.approx(0.1235, abs=1e-7)
    assert reward_of({"scorer": "clipscore", "vqa_score": 0.123456}) == pytest.approx(0.123456, abs=1e-7)


def test_run_arguments_and_bad_runs(tmp_path) -> None:
    assert parse_run("runs/a:0.25").weight == 0.25 and parse_run("runs/a:0.25").uri == "runs/a"
    assert parse_run("s3://bucket/runs/a").uri == "s3://bucket/runs/a"
    assert parse_run("s3://bucket/runs/a:2").weight == 2.0
    with pytest.raises(UserError, match="positive"):
        parse_run("runs/a:0")
    with pytest.raises(UserError, match="not a run folder"):
        inventory(str(tmp_path))
