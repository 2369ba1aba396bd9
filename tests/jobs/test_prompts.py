"""jobs/prompts.py: benchmark lists become prompt tables with GORS's template flags."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq

from jobs.prompts import prompt_table
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
    assert [r["prompt_id"] for r in rows] == ["color_00000", "color_00001"]


def test_cli_writes_the_table_and_the_job_reads_the_columns(tmp_path):
    from schemas.prompts import read_prompt_tables, validate_rows

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
