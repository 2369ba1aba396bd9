from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import UserError
from pipeline.io.prompt_files import fingerprint, read_prompt_tables
from schemas.prompts import STATUS_INVALID, STATUS_OK, samples_of, validate_rows


def _write(path, **cols) -> str:
    pq.write_table(pa.table(cols), path)
    return str(path)


def _rows(path: str, samples: int = 2):
    _, tables = read_prompt_tables(path)
    return validate_rows(tables, samples, max_prompt_chars=50, max_id_chars=8)


def test_bad_rows_get_statuses_and_good_rows_pass(tmp_path) -> None:
    path = _write(
        tmp_path / "p.parquet",
        prompt=["a red car", None, "", "   \t", "x" * 51, "a blue cup", "a cat 🐱\x07", "ok"],
        prompt_id=["a", "b", "c", "d", "e", "a", "g", "waytoolongid"],
    )
    rows = _rows(path)
    by_id = {r.row: r for r in rows}
    assert [r.status for r in rows] == [STATUS_OK] + [STATUS_INVALID] * 5 + [STATUS_OK, STATUS_INVALID]
    assert by_id[1].error == "prompt is null"
    assert by_id[2].error == "prompt is empty"
    assert by_id[3].error == "prompt is whitespace only"
    assert "51 characters" in by_id[4].error
    assert by_id[5].error == "duplicate prompt_id (first used by row 0)"
    assert "prompt_id has 12 characters" in by_id[7].error
    # Control characters and emoji are just text.
    assert by_id[6].prompt == "a cat 🐱\x07"
    assert samples_of(by_id[0]) == 2 and samples_of(by_id[1]) == 1


def test_defaults_and_extra_columns(tmp_path) -> None:
    num = pa.array([3, None], pa.int32())
    path = _write(tmp_path / "p.parquet", prompt=["a", "b"], source=["x", "y"], num_samples=num)
    rows = _rows(path, samples=5)
    assert [r.prompt_id for r in rows] == ["0", "1"]
    assert [r.num_samples for r in rows] == [3, 5]
    assert rows[0].extra == {"source": "x"}


def test_folder_is_read_in_sorted_order_and_fingerprinted(tmp_path) -> None:
    (tmp_path / "in").mkdir()
    _write(tmp_path / "in" / "b.parquet", prompt=["b0", "b1"])
    _write(tmp_path / "in" / "a.parquet", prompt=["a0"])
    files, tables = read_prompt_tables(str(tmp_path / "in"))
    rows = validate_rows(tables, 1, 100, 100)
    assert [r.prompt for r in rows] == ["a0", "b0", "b1"]
    fp = fingerprint(files, tables)
    assert fp["total_rows"] == 3 and [f["rows"] for f in fp["files"]] == [1, 2]


def _fp(path) -> str:
    files, tables = read_prompt_tables(str(path))
    return fingerprint(files, tables)["content_sha256"]


def test_fingerprint_is_the_content_not_the_path_size_or_row_count(tmp_path) -> None:
    a = _write(tmp_path / "a.parquet", prompt=["a red cube", "a blue ball"])
    before = _fp(a)
    _write(tmp_path / "a.parquet", prompt=["a red cubE", "a blue ball"])  # same length, same rows
    assert _fp(a) != before
    (tmp_path / "moved").mkdir()
    _write(tmp_path / "moved" / "b.parquet", prompt=["a red cube", "a blue ball"])
    assert _fp(tmp_path / "moved" / "b.parquet") == before


def test_hive_partition_folders_are_columns(tmp_path) -> None:
    for cat in ("color", "shape"):
        (tmp_path / "in" / f"category={cat}" / "seed=7").mkdir(parents=True)
        _write(tmp_path / "in" / f"category={cat}" / "seed=7" / "part-0.parquet", prompt=[f"a {cat}"])
    (tmp_path / "in" / "category=color" / "_SUCCESS").write_text("")
    rows = _rows(str(tmp_path / "in"))
    assert [(r.prompt, r.category, r.seed) for r in rows] == [("a color", "color", 7), ("a shape", "shape", 7)]
    assert all(r.extra == {} for r in rows)


def test_hive_partition_that_does_not_fit_its_column_is_one_line(tmp_path) -> None:
    (tmp_path / "in" / "seed=abc").mkdir(parents=True)
    _write(tmp_path / "in" / "seed=abc" / "p.parquet", prompt=["a"])
    with pytest.raises(UserError, match="hive partition seed=abc does not fit int64"):
        read_prompt_tables(str(tmp_path / "in"))


def test_symlink_loops_end_and_each_file_is_read_once(tmp_path) -> None:
    (tmp_path / "in" / "sub").mkdir(parents=True)
    _write(tmp_path / "in" / "sub" / "a.parquet", prompt=["a"])
    (tmp_path / "in" / "sub" / "loop").symlink_to(tmp_path / "in")
    (tmp_path / "in" / "also.parquet").symlink_to(tmp_path / "in" / "sub" / "a.parquet")
    files, tables = read_prompt_tables(str(tmp_path / "in"))
    assert len(files) == 1 and sum(t.num_rows for t in tables) == 1


def test_a_run_folder_inside_the_prompts_folder_is_refused(tmp_path) -> None:
    (tmp_path / "in" / "run" / "shards").mkdir(parents=True)
    _write(tmp_path / "in" / "p.parquet", prompt=["a"])
    (tmp_path / "in" / "run" / "run.json").write_text("{}")
    _write(tmp_path / "in" / "run" / "shards" / "000000.parquet", prompt=["old"])
    with pytest.raises(UserError, match="holds a run folder"):
        read_prompt_tables(str(tmp_path / "in"))


def test_bom_nan_null_ids_and_seed_overflow_are_row_level(tmp_path) -> None:
    path = _write(
        tmp_path / "p.parquet",
        prompt=["\ufeffa red cube", "a blue ball", "a green bench", "a pink chair", "a cat"],
        prompt_id=[None, "0", None, "2", "big"],
        score=[float("nan"), float("inf"), 1.5, None, float("-inf")],
        seed=pa.array([None, None, None, None, 2**63 - 1], pa.int64()),
    )
    rows = _rows(path, samples=2)
    assert rows[0].prompt == "a red cube"
    ids = [r.prompt_id for r in rows]
    assert len(set(ids)) == 5 and ids[1] == "0" and ids[3] == "2"  # explicit ids keep their text
    assert [r.status for r in rows] == [STATUS_OK] * 4 + [STATUS_INVALID]
    assert "does not fit int64" in rows[4].error
    assert [r.extra["score"] for r in rows] == [None, None, 1.5, None, None]
    one = _rows(path, samples=1)  # seed + index 0 fits
    assert one[4].status == STATUS_OK


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: str(p / "missing.parquet"), "no such file or folder"),
        (lambda p: (p.joinpath("x.parquet").write_text("junk"), str(p / "x.parquet"))[1], "not a readable Parquet"),
        (lambda p: _write(p / "n.parquet", text=["a"]), "no 'prompt' column"),
        (lambda p: _write(p / "t.parquet", prompt=[1, 2]), "column 'prompt' must be string"),
        (lambda p: _write(p / "s.parquet", prompt=["a"], seed=["x"]), "column 'seed' must be int64"),
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
    _write(tmp_path / "in" / "a.parquet", prompt=["a"])
    (tmp_path / "in" / "b.parquet").write_bytes(b"PAR1garbage")
    with pytest.raises(UserError, match="b.parquet: not a readable Parquet"):
        read_prompt_tables(str(tmp_path / "in"))


def test_integer_prompt_ids_are_accepted_as_text(tmp_path) -> None:
    path = _write(tmp_path / "p.parquet", prompt=["a", "b"], prompt_id=[7, 9])
    assert [r.prompt_id for r in _rows(path)] == ["7", "9"]
