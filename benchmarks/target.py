"""GPU-efficiency proxy of accept-until-target: samples per second with a target vs a fixed K.

    python benchmarks/target.py [--models small|tiny] [--prompts 12] [--target 2] [--max-samples 6]
        [--acceptance 0.5] [--reps 2] [--threads N] [--json]

One shard, in this process (``ShardProcessor``, no Ray), on the small model set (configs/small.yaml)
by default. Variants, interleaved per rep so machine load hits both alike:
  fixed:  ``--target`` samples per prompt (the old scheme; every batch full but the last);
  target: in-shard refill until ``--target`` accepted or ``--max-samples`` tried (pipeline/budget/refill.py).
The small models' scores are meaningless (near-constant per prompt), so acceptance is emulated: each
decision accepts with probability ``--acceptance`` from a stable hash of the decision's position
(the same sequence in every rep). Reported per variant: samples, optimisation batches, mean batch
fill (samples per batch / engine.batch_size), wall seconds, samples/s (best rep) and accepted/s.
Samples/s is the proxy: with the engine's batch full, a target should cost no throughput.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

import pipeline.process_shard as process_shard  # noqa: E402
from benchmarks.engine import read_prompts  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.config_loading import load_config, preset_path  # noqa: E402
from pipeline.io.shards import ShardSpec  # noqa: E402
from pipeline.io.storage import filesystem_for  # noqa: E402
from pipeline.models.loading import load_generator_models, load_vqa_models  # noqa: E402
from pipeline.scoring.filter import Decision  # noqa: E402
from schemas.prompts import validate_rows  # noqa: E402


class EmulatedFilter:
    """Replaces ``decide``: accept with probability p, from a hash of the call's position."""

    def __init__(self, p: float) -> None:
        self.p, self.calls = p, 0

    def __call__(self, score: float, category: Any, fcfg: Any, template: bool = False) -> Decision:
        digest = hashlib.sha256(f"decision-{self.calls}".encode()).digest()
        self.calls += 1
        return Decision(accepted=int.from_bytes(digest[:8], "big") / 2**64 < self.p, threshold=0.0)


def run_variant(cfg: Config, models: tuple[Any, Any], prompts: list[str], p: float) -> dict[str, Any]:
    rows = validate_rows([pa.table({"prompt": prompts})], cfg.job.samples_per_prompt, 1000, 128)
    processor = process_shard.ShardProcessor(cfg, models[0], models[1], {"vqa": "bench"})
    batches: list[int] = []
    run = processor.engine.run

    def counted(requests, progress=None):
        batches.append(len(requests))
        return run(requests, progress)

    processor.engine.run = counted
    process_shard.decide = EmulatedFilter(p)
    with tempfile.TemporaryDirectory() as tmp:
        fs, out = filesystem_for(tmp)
        fs.create_dir(f"{out}/shards", recursive=True)
        t0 = time.perf_counter()
        stats = processor.process(ShardSpec(0, rows), fs, out)
        wall = time.perf_counter() - t0
    return {
        "samples": stats.samples, "accepted": stats.accepted, "short_prompts": len(stats.short),
        "batches": len(batches), "batch_fill": sum(batches) / (len(batches) * cfg.engine.batch_size),
        "wall_s": wall, "samples_per_s": stats.samples / wall, "accepted_per_s": stats.accepted / wall,
        "device_seconds": stats.device_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", choices=["small", "tiny"], default="small")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--target", type=int, default=2)
    ap.add_argument("--max-samples", type=int, default=6)
    ap.add_argument("--acceptance", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_config(preset_path(args.models), [f"job.shard_size={args.prompts}"])
    fixed = copy.deepcopy(base)
    fixed.job.samples_per_prompt = args.target
    target = copy.deepcopy(base)
    target.job.target_accepted, target.job.max_samples_per_prompt = args.target, args.max_samples
    models = (load_generator_models(base), load_vqa_models(base))
    prompts = read_prompts(args.prompts)
    run_variant(fixed, models, prompts[:1], 1.0)  # warm-up
    results: dict[str, list[dict[str, Any]]] = {"fixed": [], "target": []}
    for rep in range(args.reps):
        for name, cfg in (("fixed", fixed), ("target", target)):
            results[name].append(run_variant(cfg, models, prompts, args.acceptance))
            print(f"rep {rep + 1} {name}: {json.dumps(results[name][-1])}", file=sys.stderr)
    best = {name: max(rs, key=lambda r: r["samples_per_s"]) for name, rs in results.items()}
    report = {
        "models": args.models, "prompts": args.prompts, "batch_size": base.engine.batch_size,
        "target": args.target, "max_samples": args.max_samples, "acceptance": args.acceptance,
        "best": best, "ratio_samples_per_s": best["target"]["samples_per_s"] / best["fixed"]["samples_per_s"],
        "reps": results,
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for name, r in best.items():
            print(f"{name:>6}: {r['samples']} samples ({r['accepted']} accepted, {r['short_prompts']} prompts short) "
                  f"in {r['batches']} batches, fill {r['batch_fill']:.0%}, {r['wall_s']:.1f} s, "
                  f"{r['samples_per_s']:.3f} samples/s, {r['accepted_per_s']:.3f} accepted/s")
        print(f"target / fixed samples/s: {report['ratio_samples_per_s']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
