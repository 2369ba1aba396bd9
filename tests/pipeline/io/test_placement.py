"""Stable placement and the nightly diff, without Ray: real Parquet placement files and real tars."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from pipeline.errors import UserError
from pipeline.io import placement as pl
from pipeline.io.nightly import NightOptions, commit_night, plan_night
from pipeline.io.retired import dataset_shards, retired_filter
from pipeline.io.shards import plan_shards
from pipeline.io.storage import filesystem_for
from schemas.prompts import PromptRow
from schemas.run import ShardStats
from schemas.samples import sample_key


def _rows(ids: list[str], text: dict[str, str] | None = None) -> list[PromptRow]:
    text = text or {}
    return [PromptRow(row=i, prompt=text.get(pid, f"prompt {pid}"), prompt_id=pid, category=None, seed=None,
                      num_samples=1) for i, pid in enumerate(ids)]


def _night(tmp_path, ids, size=2, old=None, opts=NightOptions(), text=None):
    fs, out = filesystem_for(str(tmp_path / "run"))
    fs.create_dir(out, recursive=True)
    night = plan_night(fs, out, _rows(ids, text), size, old, "sha", opts, "run")
    commit_night(fs, out, night)
    return night


def _keys(night) -> dict[str, str]:
    """prompt_id -> its first sample key."""
    return {r.prompt_id: sample_key(s.shard, s.slot(i), 0) for s in night.specs for i, r in enumerate(s.rows)}


OLD = {"history": [{"night": 1}], "input": {"content_sha256": "sha"}}


def test_first_night_is_the_positional_plan(tmp_path) -> None:
    ids = [f"p{i}" for i in range(7)]
    night = _night(tmp_path, ids, size=3)
    positional = plan_shards(_rows(ids), 3)
    assert [(s.shard, [r.prompt_id for r in s.rows]) for s in night.specs] == \
        [(s.shard, [r.prompt_id for r in s.rows]) for s in positional]
    assert all(s.slots == list(range(len(s.rows))) and s.night == 1 for s in night.specs)
    assert night.diff.new_shards == [0, 1, 2] and len(night.diff.added) == 7


def test_appended_and_inserted_rows_never_move_placed_prompts(tmp_path) -> None:
    first = _keys(_night(tmp_path, [f"p{i}" for i in range(5)]))  # shards 0, 1 and a half-full 2
    # Night 2: two rows inserted at the top, two appended, one in the middle: the placed keep their keys.
    ids = ["n0", "n1", "p0", "p1", "p2", "n2", "p3", "p4", "n3", "n4"]
    night = _night(tmp_path, ids, old=OLD)
    keys = _keys(night)
    assert {p: keys[p] for p in first} == first
    assert night.diff.new_shards == [3, 4, 5] and night.diff.counts()["added"] == 5
    assert sorted(keys[n][:6] for n in ("n0", "n1", "n2", "n3", "n4")) == ["000003"] * 2 + ["000004"] * 2 + ["000005"]
    assert all(k.isdigit() for k in keys.values()) and len(set(keys.values())) == len(keys)
    again = _night(tmp_path, ids, old={**OLD, "history": [{}, {}]})  # a rerun: same keys, nothing new
    assert _keys(again) == keys and again.diff.counts()["added"] == 0


def test_a_shard_with_removed_prompts_keeps_slots(tmp_path) -> None:
    _night(tmp_path, ["a", "b", "c", "d"])
    night = _night(tmp_path, ["b", "d"], old=OLD)  # a (slot 0) and c (slot 0 of shard 1) removed
    assert [(s.shard, s.slots) for s in night.specs] == [(0, [1]), (1, [1])]
    assert sorted(night.diff.removed) == ["a", "c"] and not night.retired_now


def test_edits_are_refused_naming_ten_ids_and_a_count_unless_redo(tmp_path) -> None:
    ids = [f"p{i:02d}" for i in range(14)]
    _night(tmp_path, ids)
    edited = {p: f"edited {p}" for p in ids[:12]}
    with pytest.raises(UserError) as err:
        _night(tmp_path, ids, old=OLD, text=edited)
    msg = str(err.value)
    assert "'p00'" in msg and "'p09'" in msg and "'p10'" not in msg and "(12 in all)" in msg and "--redo-changed" in msg
    fs, out = filesystem_for(str(tmp_path / "run"))
    assert pl.read_placement(fs, out).redone.max() == 0  # refused: nothing written
    one = _night(tmp_path, ids, old=OLD, text={"p03": "edited"}, opts=NightOptions(redo_changed=True))
    assert one.redo_shards == [1] and one.diff.changed == ["p03"]
    placed = pl.read_placement(fs, out)
    assert placed.redone[placed.index()["p03"]] == 2
    # Accepted: the next night with the same edit sees no change.
    assert _night(tmp_path, ids, old={**OLD, "history": [{}, {}]}, text={"p03": "edited"}).diff.changed == []


def test_drop_removed_retires_and_a_returning_prompt_is_live_again(tmp_path) -> None:
    _night(tmp_path, ["a", "b", "c"])
    night = _night(tmp_path, ["b", "c"], old=OLD, opts=NightOptions(drop_removed=True))
    assert night.retired_now == ["a"] and night.placement.retired_ids() == {"a"}
    assert night.placement.retired_slots() == {0: {0}}
    back = _night(tmp_path, ["a", "b", "c"], old={**OLD, "history": [{}, {}]})
    assert back.diff.restored == ["a"] and back.placement.retired_ids() == set()


def test_repeated_ids_get_their_own_slots_and_the_file_round_trips(tmp_path) -> None:
    night = _night(tmp_path, ["x", "y", "x", "x"])
    assert night.placement.ids == ["x", "y", "x\x1f1", "x\x1f2"]
    fs, out = filesystem_for(str(tmp_path / "run"))
    back = pl.read_placement(fs, out)
    assert back.ids == night.placement.ids and back.shard_size == 2
    assert (back.shard == night.placement.shard).all() and (back.digest == night.placement.digest).all()


def test_a_folder_without_placement_continues_only_on_its_own_input(tmp_path) -> None:
    legacy = {"input": {"content_sha256": "sha"}}  # run.json of a run made before placement.parquet
    fs, out = filesystem_for(str(tmp_path / "run"))
    fs.create_dir(out, recursive=True)
    night = plan_night(fs, out, _rows(["a", "b", "c"]), 2, legacy, "sha", NightOptions(), "run")
    assert night.number == 2 and [s.shard for s in night.specs] == [0, 1]
    with pytest.raises(UserError, match="before prompt placement was recorded"):
        plan_night(fs, out, _rows(["a", "b", "c", "d"]), 2, legacy, "other", NightOptions(), "run")


def test_a_different_shard_size_is_refused(tmp_path) -> None:
    _night(tmp_path, ["a", "b", "c"])
    with pytest.raises(UserError, match="planned with shards of 2, not 3"):
        _night(tmp_path, ["a", "b", "c"], size=3, old=OLD)


def _shard_tar(path, keys: list[str]) -> int:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key in keys:
            for ext, data in (("png", b"img" + key.encode()), ("txt", b"t"), ("json", json.dumps({}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path.stat().st_size


def _stats(shard: int, accepted: int, tar_bytes: int) -> ShardStats:
    return ShardStats(rows=2, samples=accepted, accepted=accepted, rejected=0, failed=0, invalid_input=0, shard=shard,
                      seconds=0.0, config_hash="h", tar_bytes=tar_bytes, parquet_bytes=0, finished_at="t")


def test_retired_prompts_leave_the_listing_through_a_filtered_copy(tmp_path) -> None:
    night = _night(tmp_path, ["a", "b", "c", "d"])
    shards = tmp_path / "run" / "shards"
    shards.mkdir()
    keys0 = [sample_key(0, slot, k) for slot in (0, 1) for k in (0, 1)]
    keys1 = [sample_key(1, slot, 0) for slot in (0, 1)]
    stats = [_stats(0, 4, _shard_tar(shards / "000000.tar", keys0)),
             _stats(1, 2, _shard_tar(shards / "000001.tar", keys1))]
    before = (shards / "000000.tar").read_bytes()
    pl.set_retired(night.placement, ["a", "c", "d"], 2)  # a: half of shard 0; c and d: all of shard 1
    fs, out = filesystem_for(str(tmp_path / "run"))
    (listed,) = dataset_shards(fs, out, stats, night.placement)
    assert listed.path.startswith("filtered/000000-") and listed.accepted == 2
    with tarfile.open(tmp_path / "run" / listed.path) as tar:
        assert {n.split(".")[0] for n in tar.getnames()} == {sample_key(0, 1, 0), sample_key(0, 1, 1)}
        assert tar.extractfile(f"{sample_key(0, 1, 1)}.png").read() == b"img" + sample_key(0, 1, 1).encode()
    assert (shards / "000000.tar").read_bytes() == before  # the shard's own files are never rewritten
    live = retired_filter(night.placement)
    assert [live({"shard": 0, "key": k}) for k in keys0] == [False, False, True, True]
