"""Driver cost of planning a night on a big run folder: an append of 1,000 rows onto 1,000,000 placed ones.

    python benchmarks/plan_append.py [--placed 1000000] [--append 1000] [--shard-size 64] [--json]

Writes a prompt table of ``--placed`` rows, plans it from scratch into a run folder (placement.parquet),
then appends ``--append`` rows to the table and plans again. Each step runs in a fresh process, as the
driver does, and reports its wall time and peak RSS for:
- ``plan``: read the placement, diff tonight's rows against it, place the new ones, write it back
  (pipeline/io/nightly.py plan_night + commit_night);
- ``driver``: the whole planning path before Ray: read and validate the prompt table, then ``plan``.
Target (issue 27): the append's driver path under 10 s and 2 GB, at the cost order of planning from scratch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_STEP = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
cpu = time.process_time
from pipeline.io.nightly import NightOptions, commit_night, plan_night
from pipeline.io.storage import filesystem_for
from pipeline.io.prompt_files import read_prompt_tables
from schemas.prompts import validate_rows
t_import, c_import = time.perf_counter(), cpu()
files, tables = read_prompt_tables({prompts!r})
rows = validate_rows(tables, 1, 1000, 200)
t_rows, c_rows = time.perf_counter(), cpu()
fs, out = filesystem_for({out!r})
fs.create_dir(out, recursive=True)
old = {old}
night = plan_night(fs, out, rows, {size}, old, "sha", NightOptions(), "bench")
commit_night(fs, out, night)
t_plan, c_plan = time.perf_counter(), cpu()
print(json.dumps({{"rows": len(rows), "added": len(night.diff.added), "new_shards": len(night.diff.new_shards),
                   "shards": night.placement.num_shards, "read_validate_s": round(t_rows - t_import, 2),
                   "plan_s": round(t_plan - t_rows, 2), "driver_s": round(t_plan - t_import, 2),
                   "read_validate_cpu_s": round(c_rows - c_import, 2), "plan_cpu_s": round(c_plan - c_rows, 2),
                   "driver_cpu_s": round(c_plan - c_import, 2),
                   "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}}))
"""


def make_table(path: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({
        "prompt": [f"a red cube number {i} beside a blue ball" for i in range(n)],
        "prompt_id": [f"prompt-{i:08d}" for i in range(n)],
        "category": ["color"] * n,
    }), path)


def step(prompts: Path, out: Path, size: int, appending: bool) -> dict:
    old = '{"history": [{"night": 1}], "input": {"content_sha256": "sha"}}' if appending else "None"
    code = _STEP.format(root=str(ROOT), prompts=str(prompts), out=str(out), size=size, old=old)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--placed", type=int, default=1_000_000)
    p.add_argument("--append", type=int, default=1_000)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="plan-append-") as tmp:
        tmp_path = Path(tmp)
        make_table(tmp_path / "night1.parquet", args.placed)
        make_table(tmp_path / "night2.parquet", args.placed + args.append)
        out = tmp_path / "run"
        scratch = step(tmp_path / "night1.parquet", out, args.shard_size, appending=False)
        append = step(tmp_path / "night2.parquet", out, args.shard_size, appending=True)
        placement_mb = (out / "placement.parquet").stat().st_size / 2**20
    result = {"placed": args.placed, "append": args.append, "shard_size": args.shard_size,
              "placement_file_mb": round(placement_mb, 1), "scratch": scratch, "append_night": append}
    if args.json:
        print(json.dumps(result))
    else:
        for name in ("scratch", "append_night"):
            r = result[name]
            print(f"{name:>12}: {r['rows']} rows, {r['added']} placed in {r['new_shards']} new shards "
                  f"(of {r['shards']}): plan {r['plan_s']} s ({r['plan_cpu_s']} s CPU), driver path "
                  f"{r['driver_s']} s ({r['driver_cpu_s']} s CPU; read + validate {r['read_validate_s']} s), "
                  f"peak RSS {r['peak_rss_mb']} MB")
        print(f"placement.parquet: {result['placement_file_mb']} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
