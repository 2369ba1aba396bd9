"""Smoke test of benchmarks/scale.py: the real driver and pool, no-op processor, two simulated nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.noop_processor import NOOP_SECONDS_ENV
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_scale_benchmark_reports_driver_overhead_per_shard() -> None:
    # Paced shards (1 s each): instant ones can all go to the first ready actor before the
    # once-a-second memory sampler sees the second.
    env = dict(os.environ, **{NOOP_SECONDS_ENV: "1"})
    proc = subprocess.run(
        [sys.executable, "benchmarks/scale.py", "--shards", "12", "--actors", "2", "--nodes", "2", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (got["shards"], got["actors"], got["nodes"]) == (12, 2, 2)
    assert 0 < got["driver_ms_per_shard"] and got["driver_cpu_s"] > 0 and got["peak_driver_rss_mb"] > 50
    assert 0 < got["time_to_first_shard_s"] < got["wall_s"]
    assert got["actors_seen"] == 2 and got["actor_rss_mb"] > 0
