"""GORS-style LoRA finetuning of Stable Diffusion on one or several runs' accepted samples.

    referee-synth finetune --run RUN[:WEIGHT] [--run ...] --output DIR [--config configs/gors.yaml ...]
        [--set finetune.KEY=VALUE ...] [--steps N] [--num-workers N] [--gpu] [--storage-path URI]

``--num-workers 0`` (default): one process here (a GPU if visible, else the CPU), checkpoints under
OUTPUT/checkpoints/. ``--num-workers N``: Ray Train with N workers (``ray job submit -- python
jobs/finetune.py ...`` on a cluster), checkpoints under ``--storage-path`` (default OUTPUT/ray; shared storage
such as s3:// on several nodes). Either way a rerun of the same command resumes from the newest checkpoint.
OUTPUT gets pytorch_lora_weights.safetensors (``pipe.load_lora_weights(OUTPUT)``), README.md and
finetune.json (runs, their config hashes, steps, the objective's exactness record) and loss.csv.
docs/FINETUNE.md says what is GORS's and what differs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python jobs/finetune.py` (ray job submit) puts jobs/ first on the path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.cli import run_main  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.config_loading import load_config  # noqa: E402
from pipeline.errors import UserError  # noqa: E402

# Test hook: exit abruptly right after the checkpoint of this step is stored (the kill-and-resume test).
EXIT_AFTER_ENV = "REFEREE_SYNTH_FINETUNE_EXIT_AFTER"
PLAN_FILE = "plan.json"
RAY_NAME = "finetune"  # the Ray Train experiment under --storage-path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="referee-synth finetune", description=__doc__.split("\n")[0])
    p.add_argument("--run", action="append", required=True, metavar="RUN[:WEIGHT]",
                   help="a run folder (local, s3://, gs://); several are mixed by weight (default 1 each)")
    p.add_argument("--output", required=True, help="folder for the LoRA, its card and the loss curve")
    p.add_argument("--config", action="append", help="YAML preset(s), e.g. configs/gors.yaml [configs/gors-sd2.yaml]")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    p.add_argument("--steps", type=int, help="training steps (finetune.max_steps)")
    p.add_argument("--num-workers", type=int, default=0,
                   help="0: train in this process; N: Ray Train with N workers")
    p.add_argument("--gpu", action="store_true", help="with --num-workers: one GPU per worker")
    p.add_argument("--storage-path", help="Ray Train checkpoints (default OUTPUT/ray; shared storage on a cluster)")
    p.add_argument("--force", action="store_true", help="start over although OUTPUT has checkpoints of another setup")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    sets = list(args.set)
    if args.steps is not None:
        sets.append(f"finetune.max_steps={args.steps}")
    return load_config(args.config, sets)


def _plan_record(cfg: Config, runs: list[Any]) -> dict[str, Any]:
    """What a resume must match: the training settings and the data."""
    from pipeline.finetune.train import base_model_name

    ft = {k: v for k, v in vars(cfg.finetune).items() if k not in ("max_steps", "checkpoint_every", "checkpoints_kept")}
    return {"finetune": ft, "base_model": base_model_name(cfg),
            "runs": [[inv.uri, w, inv.config_hash] for inv, w in runs]}


def _check_plan(output: str, plan: dict[str, Any], force: bool) -> None:
    from pipeline.finetune.output import CHECKPOINTS
    from pipeline.io import storage

    fs, out = storage.filesystem_for(output)
    path = storage.join(out, CHECKPOINTS, PLAN_FILE)
    if storage.exists(fs, path) and not force:
        old = json.loads(storage.read_bytes(fs, path))
        if json.loads(json.dumps(plan)) != old:
            raise UserError(f"--output {output} has checkpoints of another setup (settings or runs differ); "
                            "use another --output, or --force to start over")
    elif force and storage.exists(fs, storage.join(out, CHECKPOINTS)):
        fs.delete_dir(storage.join(out, CHECKPOINTS))
    storage.write_atomic(fs, path, json.dumps(plan).encode())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    if args.num_workers < 0:
        raise UserError("--num-workers must be >= 0")
    from pipeline.finetune.data import inventory, parse_run
    from pipeline.finetune.train import FinetuneSpec

    sources = [parse_run(r) for r in args.run]
    runs = [(inventory(s.uri), s.weight) for s in sources]
    spec = FinetuneSpec(config=cfg.to_dict(), runs=runs, progress=not args.no_progress)
    print(f"finetune: {sum(inv.accepted for inv, _ in runs)} accepted samples from {len(runs)} run(s), "
          f"{cfg.finetune.max_steps} steps", file=sys.stderr)
    _check_plan(args.output, _plan_record(cfg, runs), args.force)
    if args.num_workers == 0:
        return _single_process(spec, args.output)
    return _ray(spec, args)


def _single_process(spec: Any, output: str) -> int:
    from pipeline.finetune.output import fetch_latest_checkpoint, publish_checkpoint, write_output
    from pipeline.finetune.train import base_model_name, train_worker

    cfg = spec.cfg
    exit_after = int(os.environ.get(EXIT_AFTER_ENV, "0") or 0)

    def publish(step: int, folder: str, metrics: dict[str, Any]) -> None:
        publish_checkpoint(output, step, folder, cfg.finetune.checkpoints_kept)
        if exit_after and step == exit_after:
            os._exit(137)  # as a kill would: no cleanup, nothing after the stored checkpoint

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="finetune-resume-") as tmp:
        step = fetch_latest_checkpoint(output, Path(tmp))
        if step is not None:
            print(f"finetune: resuming from the checkpoint at step {step}", file=sys.stderr)
        loop = train_worker(spec, tmp if step is not None else None, publish)
    card = write_output(output, cfg, base_model_name(cfg), spec.runs, loop, 1, time.perf_counter() - t0,
                        str(loop.parts.device))
    print(f"finetune: {card['steps']} steps, final loss {card['final_loss']:.4f}; LoRA in {output}", file=sys.stderr)
    return 0


def _ray(spec: Any, args: argparse.Namespace) -> int:
    import ray

    from actors.finetune_trainer import fit
    from jobs.synthesize import start_ray
    from pipeline.io import storage

    storage_path = args.storage_path or storage.join(args.output, "ray")
    if "://" not in storage_path:
        storage_path = str(Path(storage_path).resolve())
    if args.force:  # Ray Train would resume from this experiment's newest checkpoint
        fs, root = storage.filesystem_for(storage_path)
        if storage.exists(fs, storage.join(root, RAY_NAME)):
            fs.delete_dir(storage.join(root, RAY_NAME))
    started = start_ray(dashboard=False)
    try:
        result = fit(spec, args.output, args.num_workers, args.gpu, storage_path, RAY_NAME)
    finally:
        if started:
            ray.shutdown()
    if result.error is not None:
        print(f"error: finetune failed: {str(result.error).splitlines()[0][:300]}", file=sys.stderr)
        return 1
    print(f"finetune: done; LoRA in {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
