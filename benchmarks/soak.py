"""Soak: the tiny-model job over many prompts with random actor kills, checked for loss and duplicates.

    python benchmarks/soak.py [--prompts 2000] [--kill-prob 0.05] [--num-actors 2] [--shard-size 16] [--json]

Runs the job twice on the same prompts: once clean, once with actors killed at random after a
batch (``REFEREE_SYNTH_RANDOM_KILL``). A faulty run that exits 1 (a shard out of retries) is rerun,
as a user would, until it completes. Then every run folder is checked: rows x samples in equals
records out, no duplicate (row, sample) and no duplicate key, every accepted record in exactly one
tar. Prints one summary line (and a JSON object with --json).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPBENCH = ROOT / "data" / "t2i-compbench"


def make_prompts(path: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts, cats = [], []
    files = sorted(COMPBENCH.glob("*_train.txt"))
    while len(prompts) < n:
        for f in files:
            for line in f.read_text().splitlines():
                if line.strip() and len(prompts) < n:
                    prompts.append(line.strip())
                    cats.append(f.stem.removesuffix("_train"))
    ids = [f"soak{i:06d}" for i in range(n)]
    pq.write_table(pa.table({"prompt": prompts, "prompt_id": ids, "category": cats}), path)


def run_job(prompts: Path, out: Path, args: argparse.Namespace, env: dict[str, str]) -> tuple[int, float]:
    cmd = [sys.executable, str(ROOT / "jobs" / "synthesize.py"), "--prompts", str(prompts), "--output", str(out),
           "--config", "configs/tiny.yaml", "--no-progress", "--num-actors", str(args.num_actors),
           "--shard-size", str(args.shard_size)]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"soak: job failed with exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.returncode, time.time() - t0


def check(out: Path, rows: int) -> dict[str, int]:
    import pyarrow.parquet as pq

    records = []
    for f in sorted((out / "shards").glob("*.parquet")):
        records += pq.read_table(f).to_pylist()
    pairs = collections.Counter((r["row"], r["sample_index"]) for r in records)
    keys = collections.Counter(r["key"] for r in records)
    in_tars: collections.Counter[str] = collections.Counter()
    for tar_path in (out / "shards").glob("*.tar"):  # rejected images live in rejected/
        with tarfile.open(tar_path) as tar:
            in_tars.update(n.split(".")[0] for n in tar.getnames() if n.endswith(".json"))
    accepted = {r["key"] for r in records if r["status"] == "accepted"}
    return {
        "rows_in": rows,
        "rows_out": len(pairs),
        "records": len(records),
        "duplicates": sum(c - 1 for c in pairs.values() if c > 1) + sum(c - 1 for c in keys.values() if c > 1),
        "missing": rows - len({r for r, _ in pairs}),
        "accepted_not_in_tar": len(accepted - set(in_tars)),
        "tar_duplicates": sum(c - 1 for c in in_tars.values() if c > 1),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=2000)
    p.add_argument("--kill-prob", type=float, default=0.05, help="chance an actor dies after a batch")
    p.add_argument("--num-actors", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=16)
    p.add_argument("--max-reruns", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        prompts = Path(tmp) / "prompts.parquet"
        make_prompts(prompts, args.prompts)
        _, clean_s = run_job(prompts, Path(tmp) / "clean", args, env)
        faulty_env = dict(env, REFEREE_SYNTH_RANDOM_KILL=f"{args.kill_prob}:7")
        reruns, faulty_s = 0, 0.0
        while True:
            code, seconds = run_job(prompts, Path(tmp) / "faulty", args, faulty_env)
            faulty_s += seconds
            if code == 0 or reruns >= args.max_reruns:
                break
            reruns += 1
        result = {name: check(Path(tmp) / name, args.prompts) for name in ("clean", "faulty")}
        summary = json.loads((Path(tmp) / "faulty" / "summary.json").read_text())
    result.update(
        prompts=args.prompts, kill_prob=args.kill_prob, clean_seconds=round(clean_s, 1),
        faulty_seconds=round(faulty_s, 1), slowdown=round(faulty_s / clean_s, 3), reruns=reruns,
        retries_last_run=summary["retries"], completed=code == 0,
    )
    f = result["faulty"]
    ok = code == 0 and f["rows_in"] == f["rows_out"] and f["duplicates"] == 0 and f["accepted_not_in_tar"] == 0
    print(f"soak: {args.prompts} prompts, kill p={args.kill_prob}: rows in {f['rows_in']} = rows out {f['rows_out']}, "
          f"duplicates {f['duplicates']}, reruns {reruns}, slowdown {result['slowdown']:.2f}x "
          f"({result['clean_seconds']:.0f}s clean, {result['faulty_seconds']:.0f}s with faults) -> "
          f"{'OK' if ok else 'FAILED'}")
    if args.json:
        print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
