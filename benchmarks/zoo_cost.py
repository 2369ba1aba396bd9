"""Per-iteration cost of each zoo referee (CPU, the small set by default).

    python benchmarks/zoo_cost.py [--models small|tiny] [--threads 2] [--iterations 6] [--json]

Times one joint iteration of Algorithm 1 (SDS + referees + update, ``InversionEngine._joint_step``) on a
batch of 4 spatial prompts, for: the paper's single BLIP-2 path, and zoos of BLIP-2 + CLIP, BLIP-2 +
detector, all three (``zoo.balance`` per_referee and total). A referee's cost is the difference it makes
to an iteration (its views, forward and backward, and under per_referee its own VAE-decoder backward).
Median over ``--iterations`` after one warm-up iteration; variants interleaved so machine load hits all.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pipeline.config import RefereeSpec, load_config, preset_path  # noqa: E402
from pipeline.engine.invert import InversionEngine, _Batch, _Slot  # noqa: E402
from pipeline.engine.invert import SampleRequest as Req  # noqa: E402
from pipeline.models.loading import load_generator_models  # noqa: E402

PROMPTS = ["a dog on the left of a cat", "a cup near a table", "a bird on the top of a chair",
           "a car on the right of a bowl"]
VARIANTS = {
    "blip2 (paper path)": ([], "per_referee"),
    "blip2+clip": (["blip2", "clip"], "per_referee"),
    "blip2+detector": (["blip2", "detector"], "per_referee"),
    "all three (per_referee)": (["blip2", "clip", "detector"], "per_referee"),
    "all three (total)": (["blip2", "clip", "detector"], "total"),
}


def _engine(gen, base, kinds: list[str], balance: str) -> InversionEngine:
    cfg = copy.deepcopy(base)
    cfg.zoo.referees = [RefereeSpec(kind=k) for k in kinds]
    cfg.zoo.balance = balance
    return InversionEngine(gen, cfg)


def _iteration_seconds(engine: InversionEngine, i: int) -> float:
    slots = [_Slot(Req(p, f"p{j}", 0, 100 + j, "spatial"), 100 + j) for j, p in enumerate(PROMPTS)]
    prompts = [s.request.prompt for s in slots]
    text = (engine.referee.encode(prompts) if engine.zoo is None
            else engine.zoo.encode(prompts, ["spatial"] * len(prompts), engine.device))
    batch = _Batch(engine._initial_latents([s.seed for s in slots]), engine.cfg.optim)
    total = engine.cfg.optim.iterations + engine.cfg.optim.tail_iterations
    t0 = time.perf_counter()
    engine._joint_step(batch, slots, prompts, text, i, total)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", choices=["small", "tiny"], default="small")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = load_config(preset_path(args.models))
    gen = load_generator_models(base)
    engines = {name: _engine(gen, base, *spec) for name, spec in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for eng in engines.values():  # warm-up (first-call allocations, spaCy, text caches)
        _iteration_seconds(eng, 1)
    for i in range(args.iterations):
        for name, eng in engines.items():
            times[name].append(_iteration_seconds(eng, 2 + i % 4))
    med = {name: statistics.median(v) for name, v in times.items()}
    base_s = med["blip2 (paper path)"]
    rows = []
    for name, s in med.items():
        rows.append({"variant": name, "seconds_per_iteration": round(s, 4), "over_paper_path": round(s - base_s, 4),
                     "added_share": round((s - base_s) / s, 3)})
    out = {"models": args.models, "threads": args.threads, "batch": len(PROMPTS), "views": base.augment.num_views,
           "image_px": base.latent.size * 8, "rows": rows}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"{args.models} set, {args.threads} threads, batch {len(PROMPTS)}, {base.augment.num_views} views")
        for r in rows:
            print(f"{r['variant']:28s} {r['seconds_per_iteration']:.4f} s/it  +{r['over_paper_path']:.4f} s"
                  f"  ({r['added_share']:.1%} of the iteration)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
