"""In-loop monitoring: monitoring off vs best iterate vs early exit, side by side, and a controlled exit case.

    python benchmarks/early_exit.py [--models small|tiny] [--prompts 8] [--samples 2] [--every 2]
        [--patience 1] [--margin 0.0] [--threads N] [--json]

Part 1, the product on the same prompts (fixed K = ``--samples`` per prompt, fixed run seed, one shard in
this process through ``ShardProcessor``, the category's real scorer): three variants
  off:          monitor.enabled false (the paper's path);
  best_iterate: checks every ``--every`` iterations, the best-scored iterate stored, no exit;
  early_exit:   checks, and a sample whose score is above threshold + margin ``--patience`` checks in a row
                leaves after the SDS tail; its slot is refilled from the shard's queue.
Per variant: iterations per sample, device seconds per sample and per accepted image, acceptance, the
monitor's own share of the device seconds, wall seconds. The random-weight models' scores are noise, so the
threshold is set to the median final score of the ``off`` run (about half accepted): what exits, and whether
acceptance holds, is then noise too, but the costs (checks, the refill, the saved iterations) are real.

Part 2, controlled: the same engine with a scorer stub of known trajectory (here only, never in the
product): sample i's score rises linearly and crosses threshold + margin at check c_i (c_i cycles over
1..checks), so early exit must stop it at iteration (c_i + patience - 1) x every and run its tail. The exit
run must make exactly the predicted iterations, keep the batch full until the queue is empty, and its
seconds per sample must fall by about the iteration ratio (the checks are free here: the stub costs ~0).
Acceptance is equal by construction (the stub's final score decides, the same in both runs).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from benchmarks.engine import read_prompts  # noqa: E402
from benchmarks.score_trajectory import Trajectory  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.config_loading import load_config, preset_path  # noqa: E402
from pipeline.engine.invert import InversionEngine, SampleRequest  # noqa: E402
from pipeline.io.shards import ShardSpec, shard_paths  # noqa: E402
from pipeline.io.storage import filesystem_for  # noqa: E402
from pipeline.models.loading import load_generator_models, load_vqa_models  # noqa: E402
from pipeline.process_shard import ShardProcessor  # noqa: E402
from schemas.prompts import validate_rows  # noqa: E402

VARIANTS = ("off", "best_iterate", "early_exit")


def variant_config(base: Config, name: str, args: argparse.Namespace, threshold: float) -> Config:
    cfg = copy.deepcopy(base)
    cfg.filter.default_threshold = threshold
    cfg.filter.thresholds = {}
    cfg.monitor.enabled = name != "off"
    cfg.monitor.every, cfg.monitor.patience, cfg.monitor.margin = args.every, args.patience, args.margin
    cfg.monitor.best_iterate = name == "best_iterate"
    cfg.monitor.early_exit = name == "early_exit"
    return cfg


def run_product(cfg: Config, models: tuple[Any, Any], prompts: list[str]) -> dict[str, Any]:
    rows = validate_rows([pa.table({"prompt": prompts})], cfg.job.samples_per_prompt, 1000, 128)
    processor = ShardProcessor(cfg, models[0], models[1], {"vqa": "bench"})
    with tempfile.TemporaryDirectory() as tmp:
        fs, out = filesystem_for(tmp)
        fs.create_dir(f"{out}/shards", recursive=True)
        t0 = time.perf_counter()
        stats = processor.process(ShardSpec(0, rows), fs, out)
        wall = time.perf_counter() - t0
        side = pq.read_table(shard_paths(out, 0)["parquet"]).to_pylist()
    n = len(side)
    monitor_s = sum(r["monitor_seconds"] or 0.0 for r in side)
    return {
        "samples": n, "accepted": stats.accepted, "acceptance": round(stats.accepted / n, 4),
        "iterations_per_sample": round(sum(r["iterations"] for r in side) / n, 3),
        "early_exits": sum(r["exit_reason"] == "early_exit" for r in side),
        "best_not_last": sum(1 for r in side if r["best_iteration"] not in (None, r["iterations"])),
        "device_seconds": round(stats.device_seconds, 3),
        "seconds_per_sample": round(stats.device_seconds / n, 4),
        "seconds_per_accepted": round(stats.device_seconds / stats.accepted, 4) if stats.accepted else None,
        "monitor_overhead": round(monitor_s / stats.device_seconds, 4) if stats.device_seconds else 0.0,
        "wall_s": round(wall, 3), "scores": [r["vqa_score"] for r in side],
    }


def run_controlled(base: Config, gen: Any, prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    it, tail, every = base.optim.iterations, base.optim.tail_iterations, args.every
    checks = (it - 1) // every  # checks before the end of the referee phase
    requests = [SampleRequest(p, f"p{i}", k, 1000 + 10 * i + k, "color")
                for i, p in enumerate(prompts) for k in range(args.samples)]
    crossing = {f"{r.prompt_id}/{r.sample_index}": 1 + j % (checks + 1) for j, r in enumerate(requests)}
    expected = []
    for r in requests:  # a crossing at check c exits at (c + patience - 1) x every if that is still a check
        stop = (crossing[f"{r.prompt_id}/{r.sample_index}"] + args.patience - 1) * every
        expected.append((stop if stop <= checks * every else it) + tail)
    out = {}
    for name in ("off", "early_exit"):
        cfg = variant_config(base, name, args, 0.5)
        cfg.monitor.enabled = True  # "off" here = monitored without exit: the same loop, all iterations
        engine = InversionEngine(gen, cfg)
        engine.monitor_score = Trajectory(crossing, 0.5, args.margin)
        sizes: list[int] = []
        grad = engine.sds.grad
        engine.sds.grad = lambda z, *a, _g=grad, _s=sizes, **k: (_s.append(z.shape[0]), _g(z, *a, **k))[1]
        t0 = time.perf_counter()
        results = engine.run(copy.deepcopy(requests))
        wall = time.perf_counter() - t0
        iters = [r.iterations for r in results]
        out[name] = {
            "iterations": sum(iters), "iterations_per_sample": round(sum(iters) / len(iters), 3),
            "early_exits": sum(r.exit_reason == "early_exit" for r in results),
            "steps": len(sizes), "mean_batch": round(sum(sizes) / len(sizes), 3),
            "full_until_queue_empty": all(s == cfg.engine.batch_size for s in sizes[: len(sizes) - (it + tail)]),
            "seconds": round(sum(r.seconds for r in results), 3), "wall_s": round(wall, 3),
        }
        if name == "early_exit":
            out[name]["matches_prediction"] = iters == expected
    out["predicted_iterations"] = sum(expected)
    out["full_iterations"] = len(requests) * (it + tail)
    out["iteration_ratio"] = round(out["off"]["iterations"] / out["early_exit"]["iterations"], 3)
    out["seconds_ratio"] = round(out["off"]["seconds"] / out["early_exit"]["seconds"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", choices=["small", "tiny"], default="small")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=2, help="fixed K per prompt")
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--patience", type=int, default=1)
    ap.add_argument("--margin", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_config(preset_path(args.models), [f"job.shard_size={args.prompts}",
                                                  f"job.samples_per_prompt={args.samples}", "job.seed=0"])
    models = (load_generator_models(base), load_vqa_models(base))
    prompts = read_prompts(args.prompts)
    run_product(variant_config(base, "off", args, 0.0), models, prompts[:1])  # warm-up
    off = run_product(variant_config(base, "off", args, 0.0), models, prompts)
    threshold = float(statistics.median(off["scores"]))
    product = {"off": run_product(variant_config(base, "off", args, threshold), models, prompts)}
    for name in VARIANTS[1:]:
        product[name] = run_product(variant_config(base, name, args, threshold), models, prompts)
    for r in product.values():
        r.pop("scores")
    controlled = run_controlled(base, models[0], prompts, args)
    report = {"models": args.models, "prompts": args.prompts, "samples_per_prompt": args.samples,
              "iterations": base.optim.iterations, "tail": base.optim.tail_iterations, "every": args.every,
              "patience": args.patience, "margin": args.margin, "threshold": threshold,
              "batch_size": base.engine.batch_size, "threads": torch.get_num_threads(),
              "product": product, "controlled": controlled}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"{args.models} models, {args.prompts} prompts x K={args.samples}, {base.optim.iterations}+"
          f"{base.optim.tail_iterations} iterations, checks every {args.every}, patience {args.patience}, "
          f"threshold {threshold:.4f} (median of the off run)")
    print(f"{'variant':<14}{'it/sample':>10}{'exits':>7}{'acc.':>7}{'s/sample':>10}{'s/accepted':>12}"
          f"{'monitor':>9}{'wall s':>9}")
    for name, r in product.items():
        spa = "n/a" if r["seconds_per_accepted"] is None else f"{r['seconds_per_accepted']:.3f}"
        print(f"{name:<14}{r['iterations_per_sample']:>10.2f}{r['early_exits']:>7}{r['acceptance']:>7.2f}"
              f"{r['seconds_per_sample']:>10.3f}{spa:>12}{r['monitor_overhead']:>9.1%}{r['wall_s']:>9.1f}")
    c = controlled
    print(f"controlled (stub trajectory): iterations {c['off']['iterations']} -> {c['early_exit']['iterations']} "
          f"(predicted {c['predicted_iterations']}, match {c['early_exit']['matches_prediction']}), "
          f"ratio {c['iteration_ratio']}x; seconds ratio {c['seconds_ratio']}x; batch full until the queue is empty: "
          f"{c['early_exit']['full_until_queue_empty']} (mean batch {c['early_exit']['mean_batch']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
