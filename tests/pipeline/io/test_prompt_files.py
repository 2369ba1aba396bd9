"""Listing and reading the prompt table's files: order, fingerprint, hive folders, symlinks, file-level errors."""

from __future__ import annotations

import pytest

from pipeline.errors import UserError
from pipeline.io.prompt_files import fingerprint, read_prompt_tables
from schemas.prompts import validate_rows
from tests.prompt_tables import read_rows, write_prompts


def test_folder_is_read_in_sorted_order_and_fingerprinted(tmp_path) -> None:
    (tmp_path / "in").mkdir()
    write_prompts(tmp_path / "in" / "b.parquet", prompt=["b0", "b1"])
    write_prompts(tmp_path / "in" / "a.parquet", prompt=["a0"])
    files, tables = read_prompt_tables(str(tmp_path / "in"))
    rows = validate_rows(tables, 1, 100, 100)
    assert [r.prompt for r in rows] == ["a0", "b0", "b1"]
    fp = fingerprint(files, tables)
    assert fp["total_rows"] == 3 and [f["rows"] for f in fp["files"]] == [1, 2]


def _fp(path) -> str:
    files, tables = read_prompt_tables(str(path))
    return fingerprint(files, tables)["content_sha256"]


def test_fingerprint_is_the_content_not_the_path_size_or_row_count(tmp_path) -> None:
    a = write_prompts(tmp_path / "a.parquet", prompt=["a red cube", "a blue ball"])
    before = _fp(a)
    write_prompts(tmp_path / "a.parquet", prompt=["a red cubE", "a blue ball"])  # same length, same rows
    assert _fp(a) != before
    (tmp_path / "moved").mkdir()
    write_prompts(tmp_path / "moved" / "b.parquet", prompt=["a red cube", "a blue ball"])
    assert _fp(tmp_path / "moved" / "b.parquet") == before


def test_hive_partition_folders_are_columns(tmp_path) -> None:
    for cat in ("color", "shape"):
        (tmp_path / "in" / f"category={cat}" / "seed=7").mkdir(parents=True)
        write_prompts(tmp_path / "in" / f"category={cat}" / "seed=7" / "part-0.parquet", prompt=[f"a {cat}"])
    (tmp_path / "in" / "category=color" / "_SUCCESS").write_text("")
    rows = read_rows(str(tmp_path / "in"))
    assert [(r.prompt, r.category, r.seed) for r in rows] == [("a color", "color", 7), ("a shape", "shape", 7)]
    assert all(r.extra == {} for r in rows)


def test_hive_partition_that_does_not_fit_its_column_is_one_line(tmp_path) -> None:
    (tmp_path / "in" / "seed=abc").mkdir(parents=True)
    write_prompts(tmp_path / "in" / "seed=abc" / "p.parquet", prompt=["a"])
    with pytest.raises(UserError, match="hive partition seed=abc does not fit int64"):
        read_prompt_tables(str(tmp_path / "in"))


def test_symlink_loops_end_and_each_file_is_read_once(tmp_path) -> None:
    (tmp_path / "in" / "sub").mkdir(parents=True)
    write_prompts(tmp_path / "in" / "sub" / "a.parquet", prompt=["a"])
    (tmp_path / "in" / "sub" / "loop").symlink_to(tmp_path / "in")
    (tmp_path / "in" / "also.parquet").symlink_to(tmp_path / "in" / "sub" / "a.parquet")
    files, tables = read_prompt_tables(str(tmp_path / "in"))
    assert len(files) == 1 and sum(t.num_rows for t in tables) == 1


def test_a_run_folder_inside_the_prompts_folder_is_refused(tmp_path) -> None:
    (tmp_path / "in" / "run" / "shards").mkdir(parents=True)
    write_prompts(tmp_path / "in" / "p.parquet", prompt=["a"])
    (tmp_path / "in" / "run" / "run.json").write_text("{}")
    write_prompts(tmp_path / "in" / "run" / "shards" / "000000.parquet", prompt=["old"])
    with pytest.raises(UserError, match="holds a run folder"):
        read_prompt_tables(str(tmp_path / "in"))


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: str(p / "missing.parquet"), "no such file or folder"),
        (lambda p: (p.joinpath("x.parquet").write_text("junk"), str(p / "x.parquet"))[1], "not a readable Parquet"),
        (lambda p: write_prompts(p / "n.parquet", text=["a"]), "no 'prompt' column"),
        (lambda p: write_prompts(p / "t.parquet", prompt=[1, 2]), "column 'prompt' must be string"),
        (lambda p: write_prompts(p / "s.parquet", prompt=["a"], seed=["x"]), "column 'seed' must be int64"),
        (lambda p: (p.joinpath("empty").mkdir(), str(p / "empty"))[1], "holds no .parquet files"),
        (lambda p: "", "the path is empty"),
    ],
)
def test_file_level_problems_are_one_line(tmp_path, make, needle) -> None:
    with pytest.raises(UserError) as info:
        read_prompt_tables(make(tmp_path))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_one_corrupt_file_among_good_ones_names_it(tmp_path) -> None:
    (tmp_path / "in").mkdir()
    write_prompts(tmp_path / "in" / "a.parquet", prompt=["a"])
    (tmp_path / "in" / "b.parquet").write_bytes(b"PAR1garbage")
    with pytest.raises(UserError, match="b.parquet: not a readable Parquet"):
        read_prompt_tables(str(tmp_path / "in"))
