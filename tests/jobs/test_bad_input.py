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
    assert {p.name for p in out.iterdir()} == {"run.json", "shards", "summary.json", "shards.txt", "README.md",
                                               "placement.parquet"}


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


def _ok(p: Path) -> list[str]:
    pq.write_table(pa.table({"prompt": ["a red cube", "a blue ball"]}), p / "ok.parquet")
    return ["--prompts", str(p / "ok.parquet")]


def _utf16_config(p: Path) -> list[str]:
    (p / "c.yaml").write_text("optim:\n  iterations: 3\n", encoding="utf-16")
    return _ok(p) + ["--config", str(p / "c.yaml")]


def _output_inside_input(p: Path) -> list[str]:
    (p / "in").mkdir()
    pq.write_table(pa.table({"prompt": ["a red cube"]}), p / "in" / "a.parquet")
    return ["--prompts", str(p / "in"), "--output", str(p / "in" / "run")]


def _input_inside_output(p: Path) -> list[str]:
    (p / "run").mkdir()
    pq.write_table(pa.table({"prompt": ["a red cube"]}), p / "run" / "a.parquet")
    return ["--prompts", str(p / "run" / "a.parquet"), "--output", str(p / "run")]


def _sibling_run_in_input(p: Path) -> list[str]:
    (p / "in" / "old-run" / "shards").mkdir(parents=True)
    pq.write_table(pa.table({"prompt": ["a red cube"]}), p / "in" / "a.parquet")
    (p / "in" / "old-run" / "run.json").write_text("{}")
    pq.write_table(pa.table({"prompt": ["old"], "key": ["00000000000"]}), p / "in" / "old-run" / "shards" / "0.parquet")
    return ["--prompts", str(p / "in")]


def _bad_hive(p: Path) -> list[str]:
    (p / "in" / "num_samples=many").mkdir(parents=True)
    pq.write_table(pa.table({"prompt": ["a red cube"]}), p / "in" / "num_samples=many" / "a.parquet")
    return ["--prompts", str(p / "in")]


def _refused_s3(p: Path) -> list[str]:
    return ["--prompts", "s3://missing-bucket/prompts.parquet"]  # endpoint: a closed port (see _FILE_ENV)


def _missing_gcs(p: Path) -> list[str]:  # no credentials, no network: bounded by job.storage_retry_time_s
    return ["--prompts", "gs://missing-bucket-referee-synth/p.parquet", "--set", "job.storage_retry_time_s=2"]


FILE_CATALOGUE = [
    ("wrong column types", _wrong_types, "column 'num_samples' must be int32"),
    ("empty table", _empty_table, "no prompt rows"),
    ("one corrupt Parquet file among good ones", _corrupt_among_good, "001.parquet: not a readable Parquet file"),
    ("config file with wrong YAML", _bad_yaml, "is not valid YAML at line"),
    ("config value of the wrong type", _wrong_yaml_type, "optim.iterations must be an integer"),
    ("UTF-16 config", _utf16_config, "is not UTF-8 text"),
    ("empty --prompts", lambda p: ["--prompts", ""], "--prompts is empty"),
    ("empty --output", lambda p: _ok(p) + ["--output", ""], "--output is empty"),
    ("output inside the prompts folder", _output_inside_input, "is inside --prompts"),
    ("prompts inside the output", _input_inside_output, "is inside --output"),
    ("a run folder inside the prompts folder", _sibling_run_in_input, "holds a run folder"),
    ("hive partition of the wrong type", _bad_hive, "hive partition num_samples=many does not fit int32"),
    ("--samples-per-prompt beyond the key", lambda p: _ok(p) + ["--samples-per-prompt", "100"],
     "job.samples_per_prompt must be <= 99"),
    ("--shard-size beyond the key", lambda p: _ok(p) + ["--shard-size", "100000"], "job.shard_size must be <= 99999"),
    ("NaN learning rate", lambda p: _ok(p) + ["--set", "optim.lr_start=.nan"], "optim.lr_start must be a finite"),
    ("NaN threshold in the config", lambda p: _ok(p) + ["--set", "filter.default_threshold=.nan"], "finite number"),
    ("NaN --threshold", lambda p: _ok(p) + ["--threshold", "nan"], "--threshold must be a finite number"),
    ("infinite --threshold", lambda p: _ok(p) + ["--threshold", "inf"], "--threshold must be a finite number"),
    ("s3 prompts, endpoint refuses", _refused_s3, "prompts: s3://missing-bucket/prompts.parquet: cannot read"),
    ("gs prompts, missing bucket", _missing_gcs, "prompts: gs://missing-bucket-referee-synth/p.parquet: cannot"),
]
# A closed port as the S3 endpoint: a refused connection, within the bounded retries.
_FILE_ENV = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
             "AWS_DEFAULT_REGION": "us-east-1"}


def _synth(args: list[str], env: dict[str, str], timeout: int = 120):
    import subprocess
    import sys

    from tests.conftest import ROOT

    return subprocess.run([sys.executable, str(ROOT / "jobs" / "synthesize.py"), "--no-progress", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _one_line_exit_2(proc, needle: str, case: str = "") -> None:
    assert proc.returncode == 2, (case, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (case, proc.stderr)


@pytest.mark.parametrize(("case", "make", "needle"), FILE_CATALOGUE, ids=[c[0] for c in FILE_CATALOGUE])
def test_file_catalogue_is_one_line_and_exit_2(tmp_path, tiny_cache, case, make, needle) -> None:
    args = make(tmp_path)
    if "--output" not in args:
        args += ["--output", str(tmp_path / "run")]
    proc = _synth(["--config", "configs/tiny.yaml", *args], _env(tiny_cache, **_FILE_ENV), timeout=90)
    _one_line_exit_2(proc, needle, case)
    assert not (tmp_path / "run" / "run.json").exists() and not (tmp_path / "in" / "run").exists()


def _strict_json(text: str):
    def refuse(name: str):
        raise ValueError(f"non-standard JSON number {name}")

    return json.loads(text, parse_constant=refuse)


def test_row_level_classes_get_statuses_and_the_run_goes_on(tmp_path, tiny_cache, shared_ray) -> None:
    """A BOM, a null id beside an explicit id that reads like a row number, a seed that overflows with its
    sample index, NaN/Inf extras and prompts with nothing to ask: row-level, never the shard."""
    big = 2**63 - 1
    table = pa.table({
        "prompt": ["\ufeffa red cube", "a blue ball", "a green bench", "!!!", "on the left", "a pink chair"],
        "prompt_id": [None, "x", "0", "bang", "left", None],
        "seed": pa.array([None, big, None, None, None, big - 1], pa.int64()),
        "num_samples": pa.array([1, 2, 1, 1, 1, 2], pa.int32()),
        "score": [float("nan"), float("inf"), 1.5, None, float("-inf"), 2.0],
    })
    pq.write_table(table, tmp_path / "p.parquet")
    out = tmp_path / "run"
    proc = _run(["--prompts", str(tmp_path / "p.parquet"), "--output", str(out), "--num-actors", "1",
                 "--shard-size", "3", "--threshold", "0"], _env(tiny_cache, **shared_ray))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    side = _sidecars(out)
    pairs = [(r["row"], r["sample_index"]) for r in side]
    assert sorted(pairs) == [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (5, 0), (5, 1)]
    by_row = {r["row"]: r for r in side}
    assert by_row[0]["prompt"] == "a red cube" and by_row[0]["status"] == "accepted"
    assert by_row[0]["prompt_id"] != "0" and by_row[2]["prompt_id"] == "0"  # no collision, explicit id kept
    assert len({r["prompt_id"] for r in side if r["sample_index"] == 0}) == 6
    assert by_row[1]["status"] == "invalid_input" and "does not fit int64" in by_row[1]["error"]
    assert [r["seed"] for r in side if r["row"] == 5] == [big - 1, big]
    for row in (3, 4):  # no noun chunk: the benchmark's 1.0 is recorded, the filter rejects by default
        rec = by_row[row]
        assert rec["status"] == "rejected" and rec["vqa_score"] == 1.0 and rec["vqa_questions"] == []
        assert "accept_unscorable" in rec["error"]
    assert [_strict_json(r["extra"])["score"] for r in sorted(side, key=lambda r: r["key"]) if r["sample_index"] == 0] \
        == [None, None, 1.5, None, None, 2.0]
    for tar_path in (out / "shards").glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            for name in tar.getnames():
                if name.endswith(".json"):
                    _strict_json(tar.extractfile(name).read())
    assert json.loads((out / "run.json").read_text())["config"]["filter"]["accept_unscorable"] is False


def _files(out: Path) -> set[str]:
    return {p.name for p in (out / "shards").iterdir()}


def test_edited_input_is_refused_by_id_and_force_leaves_nothing_of_the_old_plan(tmp_path, tiny_cache,
                                                                              shared_ray) -> None:
    env = _env(tiny_cache, **shared_ray)
    src, out = tmp_path / "p.parquet", tmp_path / "run"
    old = [f"a red cube number {i}" for i in range(6)]
    pq.write_table(pa.table({"prompt": old}), src)
    base = ["--prompts", str(src), "--output", str(out), "--num-actors", "1", "--threshold", "0"]
    assert _run(base + ["--shard-size", "2"], env).returncode == 0
    assert {n.split(".")[0] for n in _files(out)} == {"000000", "000001", "000002"}
    # Same length, same rows, same size: only the content differs.
    pq.write_table(pa.table({"prompt": old[:-1] + ["a red cubE number 5"]}), src)
    proc = _run(base + ["--shard-size", "2"], env)
    _one_line_exit_2(proc, "prompts changed since their samples were made")
    assert "'5' (1 in all)" in proc.stderr and "--redo-changed" in proc.stderr
    # A forced run with another plan: one shard of 4 rows; the old shards 1 and 2 must not stay readable.
    pq.write_table(pa.table({"prompt": ["a blue ball", "a green bench", "a pink chair"]}), src)
    proc = _run(base + ["--shard-size", "4", "--force"], env)
    assert proc.returncode == 0 and "--force: removed" in proc.stderr, proc.stderr[-3000:]
    assert {n.split(".")[0] for n in _files(out)} == {"000000"}
    side = _sidecars(out)
    assert sorted(r["prompt"] for r in side) == ["a blue ball", "a green bench", "a pink chair"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_total"] == 1 and summary["samples"] == 3


def _consumer(script: str, args: list[str], env: dict[str, str]):
    import subprocess
    import sys

    from tests.conftest import ROOT

    return subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("script", "make", "needle"), [
    ("export_gors.py", lambda p: ["--run", str(p / "run"), "--output", str(p / "file")], "is a file"),
    ("export_gors.py", lambda p: ["--run", str(p / "run"), "--output", str(p / "full")], "is not empty"),
    ("score.py", lambda p: ["--images", str(p), "--output", str(p / "file"), "--config", "configs/tiny.yaml"],
     "is a file"),
    ("score.py", lambda p: ["--shards", str(p / "run"), "--output", str(p / "file" / "x"),
                            "--config", "configs/tiny.yaml"], "is a file, not a folder"),
    ("prompts.py", lambda p: ["--output", str(p / "full"), str(p / "color_val.txt")], "is a folder"),
    ("prompts.py", lambda p: ["--output", str(p / "o.parquet"), "--seed", str(2**64), str(p / "color_val.txt")],
     "--seed must fit int64"),
])
def test_consumers_refuse_bad_outputs_before_any_work(tmp_path, tiny_cache, script, make, needle) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text('{"config_hash": "h"}')  # what readers check shards against
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    (tmp_path / "color_val.txt").write_text("a red cube\n")
    proc = _consumer(script, make(tmp_path), _env(tiny_cache))
    _one_line_exit_2(proc, needle, script)
    assert (tmp_path / "file").read_text() == "x" and [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_ctrl_c_while_an_object_store_retries_stops_at_once(tmp_path, tiny_cache) -> None:
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    cmd = [sys.executable, str(ROOT / "jobs" / "synthesize.py"), "--config", "configs/tiny.yaml", "--no-progress",
           "--prompts", "gs://missing-bucket-referee-synth/p.parquet", "--output", str(tmp_path / "run")]
    # SIGINT as a terminal delivers it: a suite started in the background (`make test &`) ignores SIGINT, and its
    # children inherit that, so Python would never raise KeyboardInterrupt in the job.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(tiny_cache), stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(4)  # well inside job.storage_retry_time_s
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.time() - t0 < 5, err
    assert err.strip().splitlines() == ["error: interrupted"]
