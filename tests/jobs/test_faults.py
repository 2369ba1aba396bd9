"""Faults injected into real runs (local Ray, tiny models): the job goes on, loses nothing, writes nothing twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, compbench_prompts
from tests.jobs.test_synthesize import SYNTH, _check_complete_run, _env, _prompts, _run, _sidecars

pytestmark = pytest.mark.slow


def _table(tmp_path: Path, n: int) -> Path:
    prompts = compbench_prompts("texture_val", n)
    return _prompts(tmp_path / "p.parquet", prompts, prompt_id=[f"t{i}" for i in range(n)])


def _tagged_processes(name: str, tag: str) -> list[int]:
    """Processes named ``name`` that carry this test's tag in their environment: other runs on the machine
    (parallel test workers, other users' Ray) are not this test's business."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if name in " ".join(p.info["cmdline"] or []) and p.environ().get("REFEREE_SYNTH_TEST_TAG") == tag:
                found.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_nan_mid_optimisation_restarts_then_fails_only_that_sample(tmp_path, tiny_cache, shared_ray) -> None:
    path = _table(tmp_path, 4)
    out = tmp_path / "run"
    # t1 goes non-finite at iteration 2 on its first attempt only: restarted with a new seed.
    # t2 goes non-finite on every attempt: failed after the restart budget.
    env = _env(tiny_cache, **shared_ray, REFEREE_SYNTH_INJECT_NAN="t1:2:1")
    proc = _run(["--prompts", str(path), "--output", str(out), "--num-actors", "1"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["prompt_id"]: r for r in _sidecars(out)}
    assert rows["t1"]["status"] != "failed" and rows["t1"]["error"] is None
    clean = _run(["--prompts", str(path), "--output", str(tmp_path / "clean"), "--num-actors", "1"],
                 _env(tiny_cache, **shared_ray))
    assert clean.returncode == 0, clean.stderr[-2000:]
    base = {r["prompt_id"]: r for r in _sidecars(tmp_path / "clean")}
    assert rows["t1"]["seed"] != base["t1"]["seed"], "the restart's new seed is recorded"
    for pid in ("t0", "t2", "t3"):  # the rest of the batch is unaffected
        assert rows[pid]["seed"] == base[pid]["seed"] and rows[pid]["vqa_score"] == base[pid]["vqa_score"]

    out2 = tmp_path / "run2"
    env2 = _env(tiny_cache, **shared_ray, REFEREE_SYNTH_INJECT_NAN="t2:2")
    proc = _run(["--prompts", str(path), "--output", str(out2), "--num-actors", "1"], env2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows2 = {r["prompt_id"]: r for r in _sidecars(out2)}
    assert rows2["t2"]["status"] == "failed" and "non-finite" in rows2["t2"]["error"]
    assert all(rows2[p]["status"] != "failed" for p in ("t0", "t1", "t3"))
    assert json.loads((out2 / "summary.json").read_text())["failed"] == 1


def test_scoring_exception_fails_one_sample_and_the_shard_completes(tmp_path, tiny_cache, shared_ray) -> None:
    path = _table(tmp_path, 4)
    out = tmp_path / "run"
    proc = _run(["--prompts", str(path), "--output", str(out), "--num-actors", "1"],
                _env(tiny_cache, **shared_ray, REFEREE_SYNTH_INJECT_SCORE_ERROR="t2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["prompt_id"]: r for r in _sidecars(out)}
    assert rows["t2"]["status"] == "failed" and "scoring failed" in rows["t2"]["error"]
    assert all(rows[p]["status"] in ("accepted", "rejected") for p in ("t0", "t1", "t3"))
    _check_complete_run(out, {(r, 0) for r in range(4)})


def test_actor_killed_twice_on_one_shard_moves_on(tmp_path, tiny_cache, shared_ray) -> None:
    path = _table(tmp_path, 6)
    out = tmp_path / "run"
    proc = _run(["--prompts", str(path), "--output", str(out), "--shard-size", "2"],
                _env(tiny_cache, **shared_ray, REFEREE_SYNTH_KILL_ACTOR_ON_SHARD="1:2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_complete_run(out, {(r, 0) for r in range(6)})
    assert json.loads((out / "summary.json").read_text())["retries"] == 2


def test_sigterm_stops_actors_and_the_rerun_resumes(tmp_path, tiny_cache, shared_ray) -> None:
    path = _table(tmp_path, 12)
    out = tmp_path / "run"
    args = ["--prompts", str(path), "--output", str(out), "--num-actors", "1", "--shard-size", "2"]
    cmd = [sys.executable, SYNTH, "--config", "configs/tiny.yaml", "--no-progress", *args]
    tag = f"sigterm-{os.getpid()}-{time.time_ns()}"  # marks this run's Ray processes (they inherit the env)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(tiny_cache, REFEREE_SYNTH_TEST_TAG=tag), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((out / "shards").glob("*.stats.json"))) < 1:
        time.sleep(0.2)
    assert _tagged_processes("ray::ShardWorker", tag), "the tag finds this run's actors while they work"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "rerun the same command to resume" in err and "Traceback" not in err
    # Every marker vouches for a complete shard.
    from pipeline.io.shards import shard_is_complete
    from pipeline.io.storage import filesystem_for

    fs, root = filesystem_for(str(out))
    cfg_hash = json.loads((out / "run.json").read_text())["config_hash"]
    for marker in (out / "shards").glob("*.stats.json"):
        assert shard_is_complete(fs, root, int(marker.name[:6]), cfg_hash)
    # The actors are gone with the driver's local Ray.
    time.sleep(2)
    assert _tagged_processes("ray::ShardWorker", tag) == []
    again = _run(args, _env(tiny_cache, **shared_ray))  # the resume itself needs no Ray of its own
    assert again.returncode == 0, again.stderr[-3000:]
    _check_complete_run(out, {(r, 0) for r in range(12)})


def test_crash_leftovers_are_detected_and_redone(tmp_path, tiny_cache, shared_ray) -> None:
    path = _table(tmp_path, 6)
    out = tmp_path / "run"
    args = ["--prompts", str(path), "--output", str(out), "--shard-size", "2"]
    assert _run(args, _env(tiny_cache, **shared_ray)).returncode == 0
    shards = out / "shards"
    tar0 = shards / "000000.tar"
    tar0.write_bytes(tar0.read_bytes()[:700])  # truncated tar behind a marker
    (shards / "000001.stats.json").unlink()  # sidecar and tar without their marker
    (shards / "000002.tar.tmp-deadbeef").write_bytes(b"half")  # a writer's leftover
    keep = {p.name: p.stat().st_mtime_ns for p in shards.glob("000002.*") if ".tmp-" not in p.name}
    again = _run(args, _env(tiny_cache, **shared_ray))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming: 1 of 3 shards already complete" in again.stderr
    assert not list(shards.glob("*.tmp-*"))
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("000002.*")} == keep
    _check_complete_run(out, {(r, 0) for r in range(6)})


def test_refused_write_fails_the_shard_cleanly_and_rerun_completes(tmp_path, tiny_cache, shared_ray) -> None:
    path = _table(tmp_path, 4)
    out = tmp_path / "run"
    args = ["--prompts", str(path), "--output", str(out), "--num-actors", "1", "--shard-size", "2",
            "--set", "job.max_shard_retries=1"]
    proc = _run(args, _env(tiny_cache, **shared_ray, REFEREE_SYNTH_REFUSE_WRITES="000001.parquet"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "write refused" in proc.stderr and "000001" in proc.stderr.strip().splitlines()[-1]
    assert not (out / "shards" / "000001.stats.json").exists()
    assert json.loads((out / "summary.json").read_text())["shards_failed"] == [1]
    again = _run(args, _env(tiny_cache, **shared_ray))
    assert again.returncode == 0, again.stderr[-3000:]
    _check_complete_run(out, {(r, 0) for r in range(4)})


def test_transient_publish_faults_are_retried_without_recomputing_the_shard(tmp_path, tiny_cache, shared_ray) -> None:
    """The sidecar upload fails twice and the marker once (a flaky object store): the actor retries each
    upload with backoff, so the shard completes on its first attempt and no GPU work is redone."""
    path = _table(tmp_path, 4)
    out = tmp_path / "run"
    args = ["--prompts", str(path), "--output", str(out), "--num-actors", "1", "--shard-size", "2",
            "--set", "job.max_shard_retries=0"]
    faults = "000001.parquet:2,000000.stats.json:1"  # both in one run
    proc = _run(args, _env(tiny_cache, **shared_ray, REFEREE_SYNTH_REFUSE_WRITES=faults))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["retries"] == 0
    _check_complete_run(out, {(r, 0) for r in range(4)})


def test_rerun_after_faults_has_exactly_one_record_per_row_and_sample(tmp_path, tiny_cache, shared_ray) -> None:
    """Several faults at once, then a clean rerun: exactly one record per input row x sample."""
    prompts = compbench_prompts("color_val", 8)
    path = _prompts(tmp_path / "p.parquet", prompts, num_samples=pa.array([2] * 8, pa.int32()))
    out = tmp_path / "run"
    args = ["--prompts", str(path), "--output", str(out), "--shard-size", "2", "--set", "job.max_shard_retries=0"]
    env = _env(tiny_cache, **shared_ray, REFEREE_SYNTH_KILL_ACTOR_ON_SHARD="0:1", REFEREE_SYNTH_RAISE_ON_SHARD="2:1")
    first = _run(args, env)
    assert first.returncode == 1
    assert _run(args, _env(tiny_cache, **shared_ray)).returncode == 0
    _check_complete_run(out, {(r, k) for r in range(8) for k in range(2)})
    assert pq.read_table(out / "shards" / "000000.parquet").num_rows == 4
    assert os.path.exists(out / "summary.json")
