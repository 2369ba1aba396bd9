"""export_gors.py without a run: file names by bytes, output checks, whole-or-absent exports."""

from __future__ import annotations

from pathlib import Path

import pytest

import jobs.export_gors as eg
from pipeline.errors import UserError


def test_mapped_names_fit_255_bytes_and_never_split_a_character() -> None:
    prompt = "ein Würfel " + "日本語の長いプロンプト_" * 40  # far beyond 255 bytes, 3-byte characters
    name = eg.mapped(prompt)
    assert len(name.encode()) <= eg._MAX_NAME_BYTES
    assert len(f"{name}_{9_999_999:06d}.png".encode()) <= 255
    name.encode().decode("utf-8")  # whole characters only
    assert eg.prompt_problem(prompt) is not None and eg.mapped("a_b") == "a b"


def test_output_checks_come_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "empty").mkdir()
    for path, needle in [(tmp_path / "file", "is a file"), (tmp_path / "full", "is not empty"),
                         (tmp_path / "file" / "sub", "is a file, not a folder")]:
        with pytest.raises(UserError, match=needle):
            eg.check_output(path)
    eg.check_output(tmp_path / "empty")
    eg.check_output(tmp_path / "new" / "deeper")


def test_a_failed_export_leaves_nothing_and_the_rerun_works(tmp_path: Path, monkeypatch) -> None:
    def half_then_fail(run, output, include_rejected, map_unsafe):
        (output / "samples").mkdir(parents=True)
        (output / "samples" / "a_000000.png").write_bytes(b"png")
        raise OSError(36, "File name too long")

    monkeypatch.setattr(eg, "export", half_then_fail)
    out = tmp_path / "gors"
    with pytest.raises(UserError, match="nothing was left there"):
        eg.export_whole("run", out, False, True)
    assert list(tmp_path.iterdir()) == []  # neither the export nor its temporary folder

    def whole(run, output, include_rejected, map_unsafe):
        (output / "samples").mkdir(parents=True)
        (output / "samples" / "a_000000.png").write_bytes(b"png")
        return {"exported": 1, "skipped": 0, "mapped": 0}

    monkeypatch.setattr(eg, "export", whole)
    eg.check_output(out)
    assert eg.export_whole("run", out, False, True)["exported"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["gors"] and (out / "samples" / "a_000000.png").is_file()
