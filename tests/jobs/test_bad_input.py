"""The bad-input catalogue: every row-level case gets a status, every file-level case one line and exit 2."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.jobs.test_synthesize import _env, _run, _sidecars

pytestmark = pytest.mark.slow

# (case, prompt, prompt_id, expected status, text the error must hold)
ROW_CATALOGUE = [
    ("plain", "a red cube and a blue ball", "plain", "ok", None),
    ("null prompt", None, "null", "invalid_input", "prompt is null"),
    ("empty prompt", "", "empty", "invalid_input", "prompt is empty"),
    ("whitespace-only prompt", " \t\n ", "ws", "invalid_input", "prompt is whitespace only"),
    ("10,000-character prompt", "a red cube " * 909 + "x", "long", "invalid_input", "10000 characters"),
    ("control characters", "a red\x00 cube\x1b[31m and a \x07bell", "ctrl", "ok", None),
    ("emoji", "a 🐱 next to a 🍎 on a ☕ table", "emoji", "ok", None),
    ("duplicate prompt_id", "a green bench", "plain", "invalid_input", "duplicate prompt_id"),
    ("over-long prompt_id", "a green bowl", "i" * 200, "invalid_input", "prompt_id has 200 characters"),
    ("prompt_id with a slash", "a blue vase", "../../etc/passwd", "ok", None),
    ("prompt_id '..'", "a brown cow", "..", "ok", None),
    ("prompt_id '.'", "a brown horse", ".", "ok", None),
    ("prompt_id with spaces", "a blue backpack", "my id with spaces", "ok", None),
    ("prompt_id empty", "a pink chair", "", "invalid_input", "prompt_id is empty"),
]


def test_row_catalogue_gets_statuses_and_run_goes_on(tmp_path, tiny_cache, shared_ray) -> None:
    prompts = [c[1] for c in ROW_CATALOGUE]
    ids = [c[2] for c in ROW_CATALOGUE]
    pq.write_table(pa.table({"prompt": pa.array(prompts, pa.string()), "prompt_id": ids}), tmp_path / "p.parquet")
    out = tmp_path / "run"
    proc = _run(["--prompts", str(tmp_path / "p.parquet"), "--output", str(out), "--num-actors", "1",
                 "--shard-size", "5", "--threshold", "0"], _env(tiny_cache, **shared_ray))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    side = {r["row"]: r for r in _sidecars(out)}
    assert len(side) == len(ROW_CATALOGUE)
    for row, (case, prompt, _, status, needle) in enumerate(ROW_CATALOGUE):
        rec = side[row]
        if status == "ok":
            assert rec["status"] == "accepted", case  # threshold 0: every generated sample passes
            assert rec["prompt"] == prompt, case  # carried verbatim
        else:
            assert rec["status"] == "invalid_input" and needle in rec["error"], (case, rec["error"])
    # Tar member names come from digit keys only, whatever the prompt or prompt_id held.
    for tar_path in (out / "shards").glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            for name in tar.getnames():
                key, _, ext = name.partition(".")
                assert key.isdigit() and ext in ("png", "txt", "json"), name
                if ext == "json":
                    meta = json.loads(tar.extractfile(name).read())
                    assert meta["key"] == key
    # Nothing was rejected (threshold 0): no rejected/ folder, and no empty rejected tar.
    assert {p.name for p in out.iterdir()} == {"run.json", "shards", "summary.json", "shards.txt", "README.md"}


def _wrong_types(p: Path) -> list[str]:
    pq.write_table(pa.table({"prompt": ["a"], "num_samples": ["three"]}), p / "w.parquet")
    return ["--prompts", str(p / "w.parquet")]


def _empty_table(p: Path) -> list[str]:
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), p / "e.parquet")
    return ["--prompts", str(p / "e.parquet")]


def _corrupt_among_good(p: Path) -> list[str]:
    (p / "in").mkdir()
    pq.write_table(pa.table({"prompt": ["a red cube"]}), p / "in" / "000.parquet")
    buf = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["a blue ball"] * 50}), buf)
    (p / "in" / "001.parquet").write_bytes(buf.getvalue()[:-40])  # truncated footer
    pq.write_table(pa.table({"prompt": ["a green bench"]}), p / "in" / "002.parquet")
    return ["--prompts", str(p / "in")]


def _bad_yaml(p: Path) -> list[str]:
    pq.write_table(pa.table({"prompt": ["a red cube"]}), p / "ok.parquet")
    (p / "bad.yaml").write_text("optim:\n  iterations: [1, 2\n  lr_start: 0.1\n")
    return ["--prompts", str(p / "ok.parquet"), "--config", str(p / "bad.yaml")]


def _wrong_yaml_type(p: Path) -> list[str]:
    pq.write_table(pa.table({"prompt": ["a red cube"]}), p / "ok.parquet")
    (p / "bad.yaml").write_text("optim:\n  iterations: lots\n")
    return ["--prompts", str(p / "ok.parquet"), "--config", str(p / "bad.yaml")]


FILE_CATALOGUE = [
    ("wrong column types", _wrong_types, "column 'num_samples' must be int32"),
    ("empty table", _empty_table, "no prompt rows"),
    ("one corrupt Parquet file among good ones", _corrupt_among_good, "001.parquet: not a readable Parquet file"),
    ("config file with wrong YAML", _bad_yaml, "is not valid YAML at line"),
    ("config value of the wrong type", _wrong_yaml_type, "optim.iterations must be an integer"),
]


@pytest.mark.parametrize(("case", "make", "needle"), FILE_CATALOGUE, ids=[c[0] for c in FILE_CATALOGUE])
def test_file_catalogue_is_one_line_and_exit_2(tmp_path, tiny_cache, case, make, needle) -> None:
    args = make(tmp_path) + ["--output", str(tmp_path / "run")]
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "synthesize.py"), "--no-progress", *args],
                          cwd=ROOT, env=_env(tiny_cache), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (case, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (case, proc.stderr)
