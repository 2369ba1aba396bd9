"""Issue 33, class 3 (and 12): one completeness rule for the resume and every reader, on hand-built run folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline.errors import UserError
from pipeline.io.completeness import scan_shards
from pipeline.io.shards import shard_is_complete
from tests.pipeline.io.handmade import CONFIG_HASH, make_run

FS = pafs.LocalFileSystem()


def _marker(out: Path, shard: int) -> Path:
    return out / "shards" / f"{shard:06d}.stats.json"


def _vouch(out: Path, shard: int, **fields) -> None:
    """Edit a marker so that it vouches for what is on disk now (an operator's copy, a buggy tool)."""
    data = json.loads(_marker(out, shard).read_text())
    data.update(fields)
    _marker(out, shard).write_text(json.dumps(data))


@pytest.fixture
def run(tmp_path) -> Path:
    out = tmp_path / "run"
    # Shard ids with a gap: the rule never assumes 0..N-1.
    make_run(out, {3: [("a red car", "accepted"), ("a blue cup", "accepted")],
                   7: [("a green bench", "accepted"), ("a pink bowl", "accepted")]})
    return out


def _problems(out: Path) -> dict[int, str]:
    scan = scan_shards(FS, str(out), CONFIG_HASH)
    assert [s.shard for s in scan.complete] == sorted({3, 7} - set(scan.incomplete))
    return scan.incomplete


def test_a_sound_run_is_complete_whatever_its_shard_ids(run) -> None:
    assert _problems(run) == {}
    assert shard_is_complete(FS, str(run), 3, CONFIG_HASH) and shard_is_complete(FS, str(run), 7, CONFIG_HASH)


def test_a_sidecar_replaced_by_another_shards_does_not_count(run) -> None:
    shutil.copy(run / "shards" / "000003.parquet", run / "shards" / "000007.parquet")
    _vouch(run, 7, parquet_bytes=(run / "shards" / "000007.parquet").stat().st_size)
    assert _problems(run) == {7: "its sidecar holds another shard's samples"}
    assert not shard_is_complete(FS, str(run), 7, CONFIG_HASH)  # the resume redoes it


def test_a_marker_of_another_config_or_shard_does_not_count(run) -> None:
    _vouch(run, 3, config_hash="other")
    shutil.copy(_marker(run, 7), run / "shards" / "000008.stats.json")
    problems = scan_shards(FS, str(run), CONFIG_HASH).incomplete
    assert problems[3].startswith("made with another configuration") and problems[8] == "its marker is shard 7's"


def test_damaged_files_do_not_count(run) -> None:
    (run / "shards" / "000007.parquet").unlink()  # a marker without its sidecar
    tar = run / "shards" / "000003.tar"
    tar.write_bytes(tar.read_bytes()[:700])  # a truncated tar
    problems = _problems(run)
    assert problems[7] == "000007.parquet is missing" and "000003.tar has 700 bytes" in problems[3]
    _marker(run, 3).write_text("{not json")
    assert _problems(run)[3] == "no readable stats marker"


def test_a_reader_without_a_sound_run_json_is_one_line(run) -> None:
    from pipeline.io.completeness import read_run

    (run / "run.json").write_text("[1, 2")
    with pytest.raises(UserError, match="run.json is not readable JSON"):
        read_run(str(run), "export")
    (run / "run.json").write_text(json.dumps(["a list"]))
    with pytest.raises(UserError, match="no config_hash"):
        read_run(str(run), "export")
    (run / "run.json").unlink()
    with pytest.raises(UserError, match="not a run folder"):
        read_run(str(run), "export")


def test_export_gors_writes_each_complete_shard_once_and_names_the_rest(run, tmp_path, capsys) -> None:
    from jobs.export_gors import main

    shutil.copy(run / "shards" / "000003.parquet", run / "shards" / "000007.parquet")
    _vouch(run, 7, parquet_bytes=(run / "shards" / "000007.parquet").stat().st_size)
    assert main(["--run", str(run), "--output", str(tmp_path / "gors")]) == 0
    names = sorted(p.name for p in (tmp_path / "gors" / "samples").iterdir())
    assert names == ["a blue cup_000001.png", "a red car_000000.png"]  # shard 3 once; shard 7 left out
    assert "shard 000007 is left out: its sidecar holds another shard's samples" in capsys.readouterr().err


def test_export_gors_with_a_damaged_run_json_is_one_line(run, tmp_path) -> None:
    from jobs.export_gors import main

    (run / "run.json").write_text("{garbled")
    with pytest.raises(UserError, match="run.json is not readable JSON"):
        main(["--run", str(run), "--output", str(tmp_path / "gors")])
    (run / "run.json").write_text(json.dumps({"config_hash": CONFIG_HASH, "config": {"filter": [1]}}))
    with pytest.raises(UserError, match="export: .*run.json: config: section 'filter' must be a mapping"):
        main(["--run", str(run), "--output", str(tmp_path / "gors")])


def test_score_shards_reads_complete_shards_only(run) -> None:
    from jobs.score import shard_samples

    shutil.copy(run / "shards" / "000003.tar", run / "shards" / "000009.tar")  # a tar without a marker
    tar = run / "shards" / "000007.tar"
    tar.write_bytes(tar.read_bytes()[:700])
    samples = shard_samples(run)
    assert [s.key for s in samples] == ["0000030000000", "0000030000100"]


def test_score_reads_a_caption_that_is_not_utf8_as_the_samples_problem(tmp_path) -> None:
    import io
    import tarfile

    from jobs.score import shard_samples
    from pipeline.io.shards import ShardWriter, encode_image  # noqa: F401 - the layout under test

    out = tmp_path / "run"
    make_run(out, {0: [("a red car", "accepted")]})
    tar_path = out / "shards" / "000000.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for m, data in members:
            data = b"\xff\xfe caption" if m.name.endswith(".txt") else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    _vouch(out, 0, tar_bytes=tar_path.stat().st_size)
    (sample,) = shard_samples(out)
    assert sample.prompt == "a red car"  # the metadata's prompt, not a UnicodeDecodeError


def test_report_skips_incomplete_shards_and_survives_a_garbled_summary(run, tmp_path, capsys) -> None:
    from jobs.report import build_report

    (run / "shards" / "000007.parquet").unlink()
    (run / "summary.json").write_text("{garbled")
    page = build_report(str(run), 4, output=tmp_path / "report").read_text()
    assert "a red car" in page and "a green bench" not in page
    err = capsys.readouterr().err
    assert "shard 000007 is left out" in err and "summary.json is damaged" in err
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(UserError, match="report: cannot write"):
        build_report(str(run), 4, output=blocked / "report")


def test_summary_index_and_card_count_complete_shards_only(run) -> None:
    from pipeline.io.run_folder import complete_stats

    shutil.copy(run / "shards" / "000003.parquet", run / "shards" / "000007.parquet")
    _vouch(run, 7, parquet_bytes=(run / "shards" / "000007.parquet").stat().st_size)
    assert [s.shard for s in complete_stats(FS, str(run), [3, 7, 11], CONFIG_HASH)] == [3]
