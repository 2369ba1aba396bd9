"""The job on a simulated autoscaling cluster (``ray.cluster_utils.Cluster``): no GPU at start, a node
with a (fake) GPU added later. The actors ask for the configured GPUs and wait for them; with no
such node the job says what is missing and exits 1. Actors run the no-op shard processor (no models)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT
from tests.jobs.test_synthesize import SYNTH, _env

pytestmark = pytest.mark.slow


@pytest.fixture
def cpu_only_cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False},
    )
    try:
        yield cluster
    finally:
        cluster.shutdown()


def _job(tmp_path: Path, cluster, extra: list[str], **env_extra: str) -> tuple[list[str], dict[str, str]]:
    pq.write_table(pa.table({"prompt": [f"a red cube number {i}" for i in range(8)]}), tmp_path / "p.parquet")
    cmd = [sys.executable, SYNTH, "--config", "configs/tiny.yaml", "--no-progress", "--prompts",
           str(tmp_path / "p.parquet"), "--shard-size", "1", *extra]
    env = _env(tmp_path, RAY_ADDRESS=cluster.address, REFEREE_SYNTH_NOOP_PROCESSOR="1", **env_extra)
    return cmd, env


def test_actors_request_gpus_and_wait_for_a_gpu_node(tmp_path, cpu_only_cluster) -> None:
    gpu_job = ["--set", "job.gpus_per_actor=0.5", "--set", "job.cpus_per_actor=1"]
    # No GPU anywhere and a short timeout: one line naming the missing resource, exit 1.
    cmd, env = _job(tmp_path, cpu_only_cluster, ["--output", str(tmp_path / "none"), "--num-actors", "2",
                                                 "--set", "job.actor_ready_timeout_s=3", *gpu_job])
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no actor ready after 3 s: each actor asks for CPU 1, GPU 0.5;"), last
    assert last.endswith("missing: GPU") and "Traceback" not in proc.stderr
    assert not list((tmp_path / "none" / "shards").glob("*.stats.json"))

    # Three actors asked for, none can start yet: the job waits (no shard done) ...
    out = tmp_path / "run"
    cmd, env = _job(tmp_path, cpu_only_cluster, ["--output", str(out), "--num-actors", "3", *gpu_job,
                                                 "--set", "job.actor_ready_timeout_s=30"],
                    REFEREE_SYNTH_NOOP_SECONDS="5")
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(12)
        assert job.poll() is None and not list((out / "shards").glob("*.stats.json"))
        # ... until a node with one GPU joins: two actors fit on it (0.5 each), the third never does.
        cpu_only_cluster.add_node(num_cpus=3, num_gpus=1)
        _, err = job.communicate(timeout=180)
    finally:
        job.kill()
    assert job.returncode == 0, err[-3000:]
    assert "first actor ready after" in err and "GPU 0.5" in err  # Ray gave it half a GPU
    # Past the ready timeout with 2 of 3 actors: a warning, and the job goes on with them.
    assert "warning: only 2 of 3 actors ready; going on with them" in err
    assert len(list((out / "shards").glob("*.stats.json"))) == 8
