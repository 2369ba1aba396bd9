"""Driver overhead at scale: the real job and pool, a no-op shard processor, a simulated multi-node cluster.

    python benchmarks/scale.py --shards 10000 --actors 64 [--nodes 4] [--json]

Starts a ``ray.cluster_utils.Cluster`` of ``--nodes`` nodes whose (fake) GPUs fit ``--actors`` actors of
one GPU each, then runs ``jobs/synthesize.py`` against it (``RAY_ADDRESS``) with one prompt per shard and
``REFEREE_SYNTH_NOOP_PROCESSOR=1``: the same scheduling, retries, progress queue, sidecar, tar and marker
writes as a real run; no models. Measures the driver process alone (its rusage: CPU seconds, peak RSS),
the wall time, the time to the first complete shard, and the actors' memory (sampled while they run).
``driver_ms_per_shard`` is driver CPU milliseconds per shard (target: <= 50 at 10,000 shards over 64 actors).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SYNTH = ROOT / "jobs" / "synthesize.py"
ACTOR_PROCESS = "ray::ShardWorker"


def make_prompts(path: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": [f"a red cube number {i}" for i in range(n)]}), path)


def start_cluster(nodes: int, actors: int) -> Any:
    """Nodes with fake GPUs (and one CPU per GPU) that fit exactly ``actors`` one-GPU actors."""
    from ray.cluster_utils import Cluster

    per = math.ceil(actors / nodes)
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": per, "num_gpus": per, "include_dashboard": False})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=per, num_gpus=per)
    return cluster


def _raylet_pids(cluster: Any) -> list[int]:
    from ray._private import ray_constants

    nodes = [cluster.head_node, *cluster.worker_nodes]
    return [n.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid for n in nodes]


class ActorMemory:
    """Samples the actors' memory (children of this cluster's raylets only) once a second."""

    def __init__(self, raylets: list[int]) -> None:
        self.raylets, self.peak_actors, self.peak_rss, self.peak_uss = raylets, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> ActorMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _actors(self) -> list[Any]:
        import psutil

        found = []
        for pid in self.raylets:
            try:
                found += [p for p in psutil.Process(pid).children(recursive=True)
                          if p.cmdline()[:1] and p.cmdline()[0].startswith(ACTOR_PROCESS)]
            except psutil.Error:
                continue
        return found

    def _loop(self) -> None:
        import psutil

        while not self._stop.wait(1.0):
            rss = uss = 0
            procs = self._actors()
            for p in procs:
                try:
                    info = p.memory_full_info()
                    rss, uss = rss + info.rss, uss + info.uss
                except psutil.Error:
                    continue
            if len(procs) >= self.peak_actors:
                self.peak_actors, self.peak_rss, self.peak_uss = len(procs), max(self.peak_rss, rss), max(
                    self.peak_uss, uss)


def run_driver(cluster: Any, prompts: Path, out: Path, actors: int) -> dict[str, Any]:
    env = dict(os.environ, RAY_ADDRESS=cluster.address, REFEREE_SYNTH_NOOP_PROCESSOR="1",
               RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(SYNTH), "--config", "configs/tiny.yaml", "--prompts", str(prompts), "--output",
           str(out), "--num-actors", str(actors), "--shard-size", "1", "--no-progress",
           "--set", "job.gpus_per_actor=1", "--set", "job.cpus_per_actor=1"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err_chunks: list[str] = []
    reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)  # the driver's own rusage: CPU seconds and peak RSS
    wall = time.time() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    if proc.returncode != 0:
        raise SystemExit(f"driver exited {proc.returncode}: {''.join(err_chunks)[-2000:]}")
    return {"t0": t0, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "maxrss_kb": usage.ru_maxrss}


def first_shard_time(out: Path, t0: float) -> float:
    stamps = []
    for marker in (out / "shards").glob("*.stats.json"):
        stamps.append(datetime.fromisoformat(json.loads(marker.read_text())["finished_at"]).timestamp())
    return min(stamps) - t0


def measure(shards: int, actors: int, nodes: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        prompts, out = Path(tmp) / "p.parquet", Path(tmp) / "run"
        make_prompts(prompts, shards)
        cluster = start_cluster(nodes, actors)
        try:
            with ActorMemory(_raylet_pids(cluster)) as mem:
                d = run_driver(cluster, prompts, out, actors)
        finally:
            cluster.shutdown()
        complete = len(list((out / "shards").glob("*.stats.json")))
        first = first_shard_time(out, d["t0"])
    if complete != shards:
        raise SystemExit(f"only {complete} of {shards} shards complete")
    per_actor = mem.peak_rss / max(mem.peak_actors, 1) / 2**20
    return {
        "shards": shards, "actors": actors, "nodes": nodes,
        "driver_cpu_s": round(d["cpu"], 2),
        "driver_ms_per_shard": round(1000 * d["cpu"] / shards, 2),
        "wall_s": round(d["wall"], 2),
        "wall_ms_per_shard": round(1000 * (d["wall"] - first) / shards, 2),  # after the first shard: scheduling
        "time_to_first_shard_s": round(first, 2),
        "peak_driver_rss_mb": round(d["maxrss_kb"] / 1024, 1),
        "actors_seen": mem.peak_actors,
        "actor_rss_mb": round(per_actor, 1),
        "actor_uss_mb": round(mem.peak_uss / max(mem.peak_actors, 1) / 2**20, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=1000)
    p.add_argument("--actors", type=int, default=16)
    p.add_argument("--nodes", type=int, default=0, help="simulated nodes (default: one per 16 actors)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()
    if args.shards < 1 or args.actors < 1:
        raise SystemExit("error: --shards and --actors must be >= 1")
    nodes = args.nodes or max(1, math.ceil(args.actors / 16))
    result = measure(args.shards, args.actors, nodes)
    if args.json:
        print(json.dumps(result))
    else:
        print(", ".join(f"{k} {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
