"""Two drivers on one output: the second stops at once, naming the first; --force does not bypass it."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from pipeline.io.lease import LEASE_NAME
from tests.conftest import ROOT, compbench_prompts
from tests.jobs.test_synthesize import SYNTH, _check_complete_run, _env, _prompts, _run

pytestmark = pytest.mark.slow


def test_second_driver_on_the_same_output_exits_2_naming_the_first(tmp_path, tiny_cache, shared_ray) -> None:
    path = _prompts(tmp_path / "p.parquet", compbench_prompts("color_val", 4))
    out = tmp_path / "run"
    args = ["--prompts", str(path), "--output", str(out), "--num-actors", "1", "--shard-size", "2"]
    env = _env(tiny_cache, **shared_ray)
    first = subprocess.Popen([sys.executable, SYNTH, "--config", "configs/tiny.yaml", "--no-progress", *args],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / LEASE_NAME).exists():
        time.sleep(0.1)
    holder = json.loads((out / LEASE_NAME).read_text())
    t0 = time.time()
    for extra in ([], ["--force"]):
        second = _run(args + extra, env, timeout=60)
        assert second.returncode == 2, second.stderr[-2000:]
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: output {out} is in use by another run: host {holder['host']} "
                               f"pid {first.pid}"), line
        assert "heartbeat" in line and "Traceback" not in second.stderr
    assert time.time() - t0 < 30
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    _check_complete_run(out, {(r, 0) for r in range(4)})
    assert not (out / LEASE_NAME).exists()  # released at the end


def test_stale_lease_is_taken_over_and_the_run_resumes(tmp_path, tiny_cache, shared_ray) -> None:
    path = _prompts(tmp_path / "p.parquet", compbench_prompts("shape_val", 2))
    out = tmp_path / "run"
    out.mkdir()
    stale = {"host": "gone-node", "pid": 1, "started_at": "2026-01-01T00:00:00+00:00",
             "heartbeat": time.time() - 5, "token": "old"}
    (out / LEASE_NAME).write_text(json.dumps(stale))
    args = ["--prompts", str(path), "--output", str(out), "--num-actors", "1"]
    env = _env(tiny_cache, **shared_ray)
    refused = _run(args + ["--set", "job.lease_stale_s=60"], env, timeout=60)
    assert refused.returncode == 2 and "host gone-node pid 1" in refused.stderr
    proc = _run(args + ["--set", "job.lease_stale_s=2", "--set", "job.lease_heartbeat_s=0.5"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: taking over" in proc.stderr and "gone-node" in proc.stderr
    _check_complete_run(out, {(0, 0), (1, 0)})
