"""Issue 33 on a real Ray (shared head, the no-op shard processor): a driver whose lease was taken over while
its shard was in flight publishes nothing more and exits 1 (class 1); an output path with non-ASCII and
brace characters runs and lists its shards (classes 4, 15); a full disk at the end is one line, exit 1 (13)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.io.lease import LEASE_NAME
from tests.conftest import ROOT
from tests.jobs.test_synthesize import SYNTH, _env

pytestmark = pytest.mark.slow


def _cmd(prompts: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, SYNTH, "--config", "configs/tiny.yaml", "--no-progress", "--prompts", str(prompts),
            "--output", str(out), "--shard-size", "1", "--num-actors", "1", *extra]


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_a_driver_taken_over_mid_shard_publishes_nothing_more_and_exits_1(tmp_path, tiny_cache, shared_ray) -> None:
    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": [f"a red cube number {i}" for i in range(4)]}), prompts)
    out, go = tmp_path / "run", tmp_path / "go"
    env = _env(tiny_cache, **shared_ray, REFEREE_SYNTH_NOOP_PROCESSOR="1", REFEREE_SYNTH_PAUSE_SHARD=f"1:{go}")
    driver = subprocess.Popen(
        _cmd(prompts, out, "--set", "job.lease_heartbeat_s=0.2", "--set", "job.lease_stale_s=2"),
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(Path(f"{go}.waiting"), driver)  # shard 0 is published; shard 1 is held before its publish
        mine = json.loads((out / LEASE_NAME).read_text())["token"]
        # Driver B takes the folder over (as after a pause past job.lease_stale_s), then shard 1 goes on.
        other = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": "now", "heartbeat": time.time(),
                 "token": "driver-b"}
        (out / LEASE_NAME).write_text(json.dumps(other))
        go.touch()
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "lost the run lease" in last and "Traceback" not in err, err[-3000:]
    markers = sorted(p.name for p in (out / "shards").glob("*.stats.json"))
    assert markers == ["000000.stats.json"]  # nothing published after the take-over
    assert json.loads((out / "shards" / "000000.stats.json").read_text())["lease_token"] == mine
    assert not (out / "shards" / "000001.tar").exists() and not (out / "summary.json").exists()
    assert json.loads((out / LEASE_NAME).read_text())["token"] == "driver-b"  # never written back


def test_an_output_with_non_ascii_and_brace_characters_runs_and_lists_its_shards(tmp_path, tiny_cache,
                                                                                 shared_ray) -> None:
    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a red cube", "a blue ball"]}), prompts)
    out = tmp_path / "nächte{a,b}"
    env = _env(tiny_cache, **shared_ray, REFEREE_SYNTH_NOOP_PROCESSOR="1")
    proc = subprocess.run(_cmd(prompts, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (out / "shards.txt").read_text().splitlines()
    assert lines == [str(out / "shards" / f"{i:06d}.tar") for i in range(2)]  # no brace pattern line
    assert all(Path(line).is_file() for line in lines)

    # Class 13: the rerun has nothing left to do; a disk that refuses shards.txt is one line, exit 1.
    full = subprocess.run(_cmd(prompts, out), cwd=ROOT, env=dict(env, REFEREE_SYNTH_REFUSE_WRITES="shards.txt"),
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert full.stderr.strip().splitlines()[-1].startswith(f"error: output {out}: could not write summary.json")
