from __future__ import annotations

import json
import tarfile

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.errors import UserError
from pipeline.io import storage
from pipeline.io.shards import PublishRetry, ShardWriter, encode_image, plan_shards, shard_is_complete, shard_paths
from pipeline.io.storage import filesystem_for
from schemas.prompts import PromptRow
from schemas.samples import SampleRecord, sample_key


def _rec(shard: int, row: int, sample: int, status: str) -> SampleRecord:
    return SampleRecord(
        key=sample_key(shard, row, sample), shard=shard, row=row, prompt_id=f"p{row}", prompt=f"prompt {row}",
        category="color", sample_index=sample, seed=sample, status=status, vqa_score=0.5, config_hash="h",
    )


def test_plan_is_deterministic_contiguous_and_complete() -> None:
    rows = [PromptRow(i, f"p{i}", str(i), None, None, 1) for i in range(10)]
    specs = plan_shards(rows, 4)
    assert [s.shard for s in specs] == [0, 1, 2]
    assert [[r.row for r in s.rows] for s in specs] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(UserError):
        plan_shards(rows, 100_000)


def test_more_shards_than_the_key_can_name_are_refused_at_planning() -> None:
    rows = [None] * (10**6 + 1)  # planning looks at the count first
    with pytest.raises(UserError, match="more than the 1000000 the sample key can name"):
        plan_shards(rows, 1)  # type: ignore[arg-type]
    assert len(plan_shards(rows[:-1], 1_000)) == 1_000


def test_keys_are_digits_and_unique() -> None:
    keys = {sample_key(s, r, k) for s in range(3) for r in range(5) for k in range(3)}
    assert len(keys) == 45 and all(k.isdigit() and len(k) == 13 for k in keys)


def test_writer_publishes_tar_sidecar_then_marker(tmp_path) -> None:
    fs, out = filesystem_for(str(tmp_path / "run"))
    w = ShardWriter(fs, out, 3, "png", keep_rejected=True)
    img = encode_image(torch.rand(3, 16, 16), "png")
    w.add(_rec(3, 0, 0, "accepted"), img)
    w.add(_rec(3, 0, 1, "rejected"), encode_image(torch.rand(3, 16, 16), "png"))
    w.add(_rec(3, 1, 0, "failed"))
    paths = shard_paths(out, 3)
    assert not fs.get_file_info(paths["stats"]).is_file  # nothing is marked before finish
    stats = w.finish(rows=2, seconds=1.0, config_hash="h")
    assert (stats.accepted, stats.rejected, stats.failed, stats.samples) == (1, 1, 1, 3)
    with tarfile.open(paths["tar"]) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile(f"{sample_key(3, 0, 0)}.json").read())
    assert names == [f"{sample_key(3, 0, 0)}.{ext}" for ext in ("png", "txt", "json")]
    assert meta["status"] == "accepted" and meta["prompt"] == "prompt 0"
    with tarfile.open(paths["rejected"]) as tar:
        assert tar.getnames() == [f"{sample_key(3, 0, 1)}.{ext}" for ext in ("png", "txt", "json")]
    side = pq.read_table(paths["parquet"]).to_pylist()
    assert [r["status"] for r in side] == ["accepted", "rejected", "failed"]
    assert shard_is_complete(fs, out, 3, "h")
    assert not shard_is_complete(fs, out, 3, "other-config")
    # A truncated tar behind a marker is detected.
    data = open(paths["tar"], "rb").read()
    open(paths["tar"], "wb").write(data[: len(data) // 2])
    assert not shard_is_complete(fs, out, 3, "h")
    # No temporary files are left next to the final names.
    assert sorted(p.name for p in (tmp_path / "run" / "shards").iterdir()) == [
        "000003.parquet", "000003.stats.json", "000003.tar",
    ]
    # Rejected images live apart from shards/, so a `shards/*.tar` glob sees accepted samples only.
    assert [p.name for p in (tmp_path / "run" / "rejected").iterdir()] == ["000003.tar"]


def test_no_rejected_tar_when_nothing_was_rejected(tmp_path) -> None:
    fs, out = filesystem_for(str(tmp_path / "run"))
    stale = tmp_path / "run" / "rejected" / "000000.tar"  # left by an earlier config of this shard
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    w = ShardWriter(fs, out, 0, "png", keep_rejected=True)
    w.add(_rec(0, 0, 0, "accepted"), encode_image(torch.rand(3, 8, 8), "png"))
    stats = w.finish(rows=1, seconds=0.1, config_hash="h")
    assert stats.rejected_tar_bytes == 0 and not stale.exists()
    assert shard_is_complete(fs, out, 0, "h")


def _retry(attempts: int) -> PublishRetry:
    return PublishRetry(attempts=attempts, backoff_s=0.01, backoff_max_s=0.02)


def test_transient_publish_faults_are_retried_with_backoff(tmp_path, monkeypatch, capsys) -> None:
    """The first two uploads of the sidecar and of the marker are refused; the shard still publishes."""
    storage._refused.clear()
    monkeypatch.setenv(storage.REFUSE_WRITES_ENV, "000005.parquet:2")
    fs, out = filesystem_for(str(tmp_path / "run"))
    w = ShardWriter(fs, out, 5, "png", keep_rejected=False, retry=_retry(3))
    w.add(_rec(5, 0, 0, "accepted"), encode_image(torch.rand(3, 8, 8), "png"))
    w.finish(rows=1, seconds=0.1, config_hash="h")
    assert shard_is_complete(fs, out, 5, "h")
    err = capsys.readouterr().err
    assert err.count("publishing") == 2 and "try 3/3 in 0.02 s" in err
    monkeypatch.setenv(storage.REFUSE_WRITES_ENV, "000006.stats.json:1")
    w = ShardWriter(fs, out, 6, "png", keep_rejected=False, retry=_retry(2))
    w.add(_rec(6, 0, 0, "accepted"), encode_image(torch.rand(3, 8, 8), "png"))
    w.finish(rows=1, seconds=0.1, config_hash="h")
    assert shard_is_complete(fs, out, 6, "h")
    capsys.readouterr()
    monkeypatch.setenv(storage.REFUSE_WRITES_ENV, "000008.parquet:1,000008.stats.json:1")  # two faults at once
    w = ShardWriter(fs, out, 8, "png", keep_rejected=False, retry=_retry(2))
    w.add(_rec(8, 0, 0, "accepted"), encode_image(torch.rand(3, 8, 8), "png"))
    w.finish(rows=1, seconds=0.1, config_hash="h")
    assert shard_is_complete(fs, out, 8, "h")
    err = capsys.readouterr().err
    assert "000008.parquet" in err and "000008.stats.json" in err and err.count("publishing") == 2


def test_a_lasting_publish_fault_fails_the_shard_after_the_bounded_tries(tmp_path, monkeypatch) -> None:
    storage._refused.clear()
    monkeypatch.setenv(storage.REFUSE_WRITES_ENV, "000007.tar")
    fs, out = filesystem_for(str(tmp_path / "run"))
    w = ShardWriter(fs, out, 7, "png", keep_rejected=False, retry=_retry(3))
    w.add(_rec(7, 0, 0, "accepted"), encode_image(torch.rand(3, 8, 8), "png"))
    with pytest.raises(OSError, match=r"write refused .* \(gave up after 3 tries\)"):
        w.finish(rows=1, seconds=0.1, config_hash="h")
    assert storage._refused[shard_paths(out, 7)["tar"]] == 3
    assert not shard_is_complete(fs, out, 7, "h")


def test_accepted_record_without_image_is_refused(tmp_path) -> None:
    fs, out = filesystem_for(str(tmp_path / "run"))
    w = ShardWriter(fs, out, 0, "png", keep_rejected=False)
    with pytest.raises(ValueError):
        w.add(_rec(0, 0, 0, "accepted"))
    w.close()


def test_a_writer_whose_driver_lost_the_lease_publishes_nothing(tmp_path) -> None:
    """Issue 33, class 1: the fence is checked before each publish; the marker carries the holder's token."""
    from pipeline.io.lease import LEASE_NAME, LeaseFence, LeaseLost

    fs, out = filesystem_for(str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    lease_file = tmp_path / "run" / LEASE_NAME
    lease_file.write_text(json.dumps({"host": "h", "pid": 1, "started_at": "t", "heartbeat": 1.0, "token": "mine"}))
    fence = LeaseFence.for_run(fs, out, "mine")
    w = ShardWriter(fs, out, 0, "png", keep_rejected=False, fence=fence)
    w.add(_rec(0, 0, 0, "accepted"), encode_image(torch.rand(3, 16, 16), "png"))
    stats = w.finish(rows=1, seconds=0.0, config_hash="h")
    assert stats.lease_token == "mine"
    assert json.loads((tmp_path / "run" / "shards" / "000000.stats.json").read_text())["lease_token"] == "mine"

    lease_file.write_text(lease_file.read_text().replace('"mine"', '"driver-b"'))  # taken over
    w = ShardWriter(fs, out, 1, "png", keep_rejected=False, fence=fence)
    w.add(_rec(1, 0, 0, "accepted"), encode_image(torch.rand(3, 16, 16), "png"))
    with pytest.raises(LeaseLost):
        w.finish(rows=1, seconds=0.0, config_hash="h")
    assert not [p.name for p in (tmp_path / "run" / "shards").iterdir() if p.name.startswith("000001")]
