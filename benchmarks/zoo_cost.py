"""Per-iteration cost of each zoo referee (CPU, the small set by default).

    python benchmarks/zoo_cost.py [--models small|tiny] [--threads 2] [--reps 5] [--json]

One joint iteration of Algorithm 1 with the three referees of configs/zoo.yaml (all active: a batch of 4
spatial prompts, ``augment.num_views`` views each, the detector its zoo.yaml 4) split into its parts,
each timed on its own: the SDS gradient, the VAE decode, and per referee its views (augmentation), its
forward + backward over the views, and the VAE-decoder backward that brings its gradient to the latents
(one per referee under ``zoo.balance: per_referee``; ``total`` shares one). Best of ``--reps`` per part
(the machine is shared: the minimum is the least disturbed); shares are of the sum of the parts.
``--clock cpu`` times this process's CPU seconds (all its threads) instead of wall time: on a loaded
machine it moves far less than the wall clock (it still counts the threads' spin-waits).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pipeline.config_loading import load_config, preset_path  # noqa: E402
from pipeline.engine.invert import InversionEngine  # noqa: E402
from pipeline.models.loading import load_generator_models  # noqa: E402

PROMPTS = ["a dog on the left of a cat", "a cup near a table", "a bird on the top of a chair",
           "a car on the right of a bowl"]
SEEDS = [100, 101, 102, 103]


CLOCK: Callable[[], float] = time.perf_counter


def _best(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        times.append(CLOCK() - t0)
    return min(times)


def measure(engine: InversionEngine, reps: int) -> dict[str, float]:
    zoo = engine.zoo
    assert zoo is not None
    z = engine._initial_latents(SEEDS).requires_grad_(True)
    text = zoo.encode(PROMPTS, ["spatial"] * len(PROMPTS), engine.device)
    total = engine.cfg.optim.iterations + engine.cfg.optim.tail_iterations
    parts = {"sds": _best(lambda: engine.sds.grad(z.detach(), PROMPTS, SEEDS, 2, 800.0, engine._autocast()), reps)}

    def decode():
        with engine._autocast():
            return engine._decode(z)

    parts["vae decode"] = _best(decode, reps)
    images = decode()
    for r, ref in enumerate(zoo.referees):
        rows = text.encoded[r].rows
        parts[f"{ref.name}: views"] = _best(lambda r=r: zoo.augmenters[r](images, SEEDS, 2), reps)
        views = zoo.augmenters[r](images, SEEDS, 2)
        n = views.shape[1]
        rep_rows = rows.repeat_rows(n)

        def referee_pass(r=r, views=views, n=n, rep_rows=rep_rows):
            leaf = views.detach().requires_grad_(True)
            with engine._autocast():
                loss = zoo.referees[r].losses(leaf.flatten(0, 1), rep_rows).total
            (loss.sum() / n).backward()
            return leaf.grad

        parts[f"{ref.name}: forward+backward"] = _best(referee_pass, reps)
        grad = referee_pass()
        parts[f"{ref.name}: vae backward"] = _best(
            lambda views=views, grad=grad: torch.autograd.grad(views, z, grad_outputs=grad, retain_graph=True), reps)
    del total
    return parts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", choices=["small", "tiny"], default="small")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    cfg = copy.deepcopy(load_config([preset_path(args.models), preset_path("zoo")]))
    engine = InversionEngine(load_generator_models(cfg), cfg)
    parts = measure(engine, args.reps)
    iteration = sum(parts.values())
    per_referee = {}
    for ref in engine.zoo.referees:
        own = sum(v for k, v in parts.items() if k.startswith(f"{ref.name}: "))
        per_referee[ref.name] = {"seconds": round(own, 4), "share": round(own / iteration, 3)}
    out = {"models": args.models, "threads": args.threads, "clock": args.clock, "batch": len(PROMPTS),
           "views": cfg.augment.num_views, "image_px": cfg.latent.size * 8,
           "parts_seconds": {k: round(v, 4) for k, v in parts.items()},
           "iteration_seconds": round(iteration, 4), "per_referee": per_referee}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{args.models} set, {args.threads} threads, batch {len(PROMPTS)}, {cfg.augment.num_views} views, "
          f"best of {args.reps}, {args.clock} clock")
    for k, v in parts.items():
        print(f"  {k:34s} {v:8.4f} s  {v / iteration:6.1%}")
    print(f"  {'iteration (sum of the parts)':34s} {iteration:8.4f} s")
    for name, r in per_referee.items():
        print(f"  referee {name:26s} {r['seconds']:8.4f} s  {r['share']:6.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
