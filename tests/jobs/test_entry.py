"""The console entry point `referee-synth`: lists the subcommands and runs the same code as jobs/X.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from jobs.entry import SUBCOMMANDS
from tests.conftest import COMPBENCH, ROOT

# `pip install -e .` (make setup) puts the script beside the interpreter.
SCRIPT = Path(sys.executable).parent / "referee-synth"


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_help_lists_every_subcommand() -> None:
    assert SCRIPT.is_file(), f"{SCRIPT} missing: install the project with `pip install -e .`"
    proc = _cli("--help")
    assert proc.returncode == 0
    for name in ("synthesize", "prompts", "score", "export-gors", "report", "evaluate", "convert", "models", "doctor",
                 "finetune"):
        assert name in SUBCOMMANDS and f"  {name} " in proc.stdout


def test_each_subcommand_shows_its_own_arguments() -> None:
    for name, flag in [("synthesize", "--prompts"), ("convert", "blip2"), ("score", "--shards"),
                       ("export-gors", "--run"), ("report", "--run"), ("evaluate", "--category"),
                       ("models", "fetch"), ("doctor", "--ray-timeout"), ("finetune", "--num-workers")]:
        proc = _cli(name, "--help")
        assert proc.returncode == 0, (name, proc.stderr)
        assert flag in proc.stdout, (name, proc.stdout[:500])


def test_misuse_is_one_line_and_exit_2() -> None:
    for args in [(), ("synthesise",)]:
        proc = _cli(*args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown subcommand 'synthesise'" in _cli("synthesise").stderr
    proc = _cli("prompts", "--output", "x.parquet", "no-such-file.txt")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: prompts: no-such-file.txt: no such file"


def test_entry_point_and_script_write_the_same_table(tmp_path: Path) -> None:
    src = str(COMPBENCH / "shape_val.txt")
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    assert _cli("prompts", "--output", str(a), src, "--limit", "5", cwd=tmp_path).returncode == 0
    script = subprocess.run([sys.executable, str(ROOT / "jobs" / "prompts.py"), "--output", str(b), src,
                             "--limit", "5"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert script.returncode == 0, script.stderr
    assert pq.read_table(a).equals(pq.read_table(b)) and pq.read_table(a).num_rows == 5
