"""A clone with nothing beside it: the README's demo inputs resolve, and nothing reads ../shared."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.io.compbench_data import COMPBENCH_DIR, available
from tests.conftest import ROOT, copy_project, project_files

# Paths that would reach outside a clone: `../shared`, or a parent folder's `shared`.
OUTSIDE = re.compile(r"\.\./shared|parent\s*/\s*[\"']shared[\"']|parents?\[\d\]\s*/\s*[\"']shared[\"']")


@pytest.fixture(scope="module")
def lone_clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's files in ``TMP/x/repo``, with no sibling folder at all."""
    repo = copy_project(tmp_path_factory.mktemp("x") / "repo")
    assert sorted(p.name for p in repo.parent.iterdir()) == ["repo"]
    return repo


def test_demo_prompts_resolve_in_a_lone_clone(lone_clone: Path, tmp_path: Path) -> None:
    make = (lone_clone / "Makefile").read_text()
    line = next(x for x in make.splitlines() if "jobs/prompts.py" in x)
    args = line.split("jobs/prompts.py", 1)[1].replace("$(DEMO_OUT)", str(tmp_path)).split()
    proc = subprocess.run([sys.executable, "jobs/prompts.py", *args], cwd=lone_clone,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(tmp_path / "prompts.parquet")
    assert table.num_rows == 8 and set(table.column("category").to_pylist()) == {"color"}


def test_no_project_file_reaches_outside_the_clone() -> None:
    hits = []
    for name in project_files():
        if name.startswith("data/") or name == "tests/test_fresh_clone.py":
            continue
        text = (ROOT / name).read_text(errors="replace")
        hits += [f"{name}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
    assert hits == []


def test_tests_collect_in_a_lone_clone(lone_clone: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=lone_clone, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"^\d+ tests collected", proc.stdout, re.M), proc.stdout[-500:]


def test_the_benchmark_lists_ship_with_their_licence() -> None:
    names = set(available())
    for category in ("color", "shape", "texture", "spatial", "non_spatial", "complex", "3d_spatial", "numeracy"):
        assert {f"{category}_train", f"{category}_val"} <= names
    # 3-in-1 averages complex prompts by these lists (3_in_1_eval/3_in_1.py)
    assert {f"complex_{split}_{kind}" for split in ("train", "val") for kind in ("spatial", "action")} <= names
    assert "MIT License" in (COMPBENCH_DIR / "LICENSE").read_text()
    assert len((COMPBENCH_DIR / "color_val.txt").read_text().splitlines()) == 300
