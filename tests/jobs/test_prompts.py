"""jobs/prompts.py: benchmark lists become prompt tables with GORS's template flags."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from jobs.prompts import prompt_table
from pipeline.errors import UserError
from tests.conftest import COMPBENCH, ROOT


def test_train_list_rows_carry_the_benchmark_index_and_template_flag():
    rows = prompt_table([COMPBENCH / "color_train.txt"]).to_pylist()
    lines = (COMPBENCH / "color_train.txt").read_text().splitlines()
    assert len(rows) == len(lines) == 700
    assert [r["benchmark_index"] for r in rows] == list(range(700))
    assert [r["prompt"] for r in rows] == [line.strip() for line in lines]
    # GORS: index < 560 of the train list is a template prompt (by the first occurrence of its text)
    first = {}
    for i, line in enumerate(lines):
        first.setdefault(line, i)
    assert [r["template"] for r in rows] == [first[line] < 560 for line in lines]
    assert sum(r["template"] for r in rows) == 560  # no prompt of lines 1-560 repeats after them
    assert rows[559]["template"] and not rows[560]["template"]


def test_val_lists_have_an_index_but_no_templates():
    rows = prompt_table([COMPBENCH / "shape_val.txt"], limit=5).to_pylist()
    assert [r["benchmark_index"] for r in rows] == list(range(5)) and not any(r["template"] for r in rows)


def test_other_files_get_no_benchmark_columns(tmp_path):
    own = tmp_path / "color_train.txt"  # the benchmark's name, not its lines
    own.write_text("a red cube\n\na blue ball\n")
    rows = prompt_table([own]).to_pylist()
    assert [(r["prompt"], r["benchmark_index"], r["template"]) for r in rows] == [
        ("a red cube", None, False), ("a blue ball", None, False)]
    assert [r["prompt_id"] for r in rows] == ["color_train_00000", "color_train_00001"]


def test_cli_writes_the_table_and_the_job_reads_the_columns(tmp_path):
    from pipeline.io.prompt_files import read_prompt_tables
    from schemas.prompts import validate_rows

    out = tmp_path / "p.parquet"
    args = ["--output", str(out), str(COMPBENCH / "texture_train.txt"), "--seed", "42"]
    proc = subprocess.run([sys.executable, "jobs/prompts.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert pq.read_table(out).schema.field("template").type == "bool"
    _, tables = read_prompt_tables(str(out))
    rows = validate_rows(tables, 1, 1000, 128)
    assert rows[0].template and rows[0].benchmark_index == 0 and rows[0].extra == {}
    assert not rows[600].template and rows[600].benchmark_index == 600


def test_ids_are_unique_across_the_files_of_one_call_and_stable(tmp_path):
    rows = prompt_table([COMPBENCH / "color_train.txt", COMPBENCH / "color_val.txt"], limit=3).to_pylist()
    ids = [r["prompt_id"] for r in rows]
    assert ids == [f"color_{s}_{i:05d}" for s in ("train", "val") for i in range(3)]
    alone = prompt_table([COMPBENCH / "color_val.txt"], limit=3).to_pylist()
    assert [r["prompt_id"] for r in alone] == ids[3:]  # the same ids whatever else is in the call
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "color_val.txt").write_text("a red cube\n")
    with pytest.raises(UserError, match="have the same name"):
        prompt_table([COMPBENCH / "color_val.txt", tmp_path / "a" / "color_val.txt"])


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    path = tmp_path / "color_x.txt"
    path.write_bytes("\ufeffa red cube\r\na blue ball\r\n".encode())
    assert [r["prompt"] for r in prompt_table([path]).to_pylist()] == ["a red cube", "a blue ball"]


def _cli(tmp_path, *args):
    return subprocess.run([sys.executable, "jobs/prompts.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize(("make", "needle"), [
    (lambda p: ["--output", str(p / "o.parquet"), "--seed", "99999999999999999999"], "--seed must fit int64"),
    (lambda p: ["--output", str(p / "o.parquet"), "--limit", "-1"], "--limit must be at least 1"),
    (lambda p: ["--output", str(p)], "is a folder"),
    (lambda p: ["--output", str(p / "f.txt" / "o.parquet")], "is a file, not a folder"),
])
def test_bad_flags_and_outputs_are_one_line_before_any_work(tmp_path, make, needle):
    (tmp_path / "f.txt").write_text("x")
    proc = _cli(tmp_path, str(COMPBENCH / "color_val.txt"), *make(tmp_path))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], \
        proc.stderr
    assert not (tmp_path / "o.parquet").exists()
