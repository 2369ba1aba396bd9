"""Before / after: does GORS finetuning on our inversion samples beat it on plain SD samples?

    python benchmarks/compare_finetunes.py --sd-run runs/color-sd --inversion-run runs/color-inv --output cmp/ \\
        --category color --category shape [--finetune-config configs/gors.yaml] [--eval-config configs/paper.yaml] \\
        [--steps N] [--limit N] [--images-per-prompt 10] [--num-workers N --gpu] [--set k=v ...] [--dry-run]
    # smoke check on the tiny models (meaningless scores, real plumbing):
    python benchmarks/compare_finetunes.py --sd-run R1 --inversion-run R2 --output cmp/ --category color \\
        --finetune-config configs/tiny.yaml --eval-config configs/tiny.yaml --steps 2 --limit 1 --images-per-prompt 1

Finetunes one LoRA on each run (jobs/finetune.py, the same settings and steps), then evaluates four rows with
jobs/evaluate.py (T2I-CompBench val prompts, images k of a prompt seeded 42 + k): base SD (sd_sampling),
GORS on SD samples (sd_sampling + the first LoRA), GORS on inversion samples (sd_sampling + the second LoRA),
and the inversion generator itself; with ``--cascade-run`` (a run made with ``--generator cascade``) a fifth
row, GORS on the cascade's samples (sd_sampling + a third LoRA). Prints and writes (``table.md``,
``table.json``) the six columns per row
with the accepted pairs each LoRA saw, the device-hours of its data (the run's shard seconds), of its training
(processes x wall time) and of the evaluation itself. Each step is skipped when its output exists (rerun to
resume). For a fair comparison make the two runs with the same prompts and the same number of accepted pairs
(``synthesize --target-accepted``); the table shows both counts. When the finetune config sets
``finetune.base_model`` (configs/gors-sd2.yaml), the LoRA rows are evaluated on that base model.
Real numbers need the hub's weights and a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.cli import EXIT_OK, run_main  # noqa: E402
from pipeline.config_loading import load_config  # noqa: E402

ROWS = (  # (key, label, generator, LoRA of which run)
    ("base", "base SD (no finetune)", "sd_sampling", None),
    ("gors_sd", "GORS on SD samples", "sd_sampling", "sd"),
    ("gors_inversion", "GORS on inversion samples", "sd_sampling", "inversion"),
    ("inversion", "inversion generator", "inversion", None),
)
CASCADE_ROW = ("gors_cascade", "GORS on cascade samples", "sd_sampling", "cascade")
COLUMNS = ("color", "shape", "texture", "spatial", "non_spatial", "complex")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compare_finetunes.py", description=__doc__.split("\n")[0])
    p.add_argument("--sd-run", required=True, help="a run made with --generator sd_sampling")
    p.add_argument("--inversion-run", required=True, help="a run made with the inversion generator")
    p.add_argument("--cascade-run", help="a run made with --generator cascade: adds its GORS row")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--category", action="append", required=True)
    p.add_argument("--finetune-config", action="append", help="default: configs/gors.yaml")
    p.add_argument("--eval-config", help="preset for the evaluations (default: the job's defaults, the paper's)")
    p.add_argument("--set", action="append", default=[], help="override for both finetunes and evaluations")
    p.add_argument("--steps", type=int)
    p.add_argument("--limit", type=int)
    p.add_argument("--images-per-prompt", type=int, default=10)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--num-actors", type=int)
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return p


def finetune_args(args: argparse.Namespace, which: str) -> list[str]:
    run = {"sd": args.sd_run, "inversion": args.inversion_run, "cascade": args.cascade_run}[which]
    out = ["--run", run, "--output", str(args.output / f"lora-{which}"), "--no-progress",
           "--num-workers", str(args.num_workers)]
    for c in args.finetune_config or ["configs/gors.yaml"]:
        out += ["--config", c]
    out += [x for s in args.set for x in ("--set", s)]
    out += ["--steps", str(args.steps)] if args.steps else []
    out += ["--gpu"] if args.gpu else []
    return out


def eval_args(args: argparse.Namespace, key: str, generator: str, lora: str | None, base_model: str) -> list[str]:
    out = [x for c in args.category for x in ("--category", c)]
    out += ["--output", str(args.output / "eval" / key), "--images-per-prompt", str(args.images_per_prompt),
            "--no-progress", "--set", f"engine.generator={generator}"]
    out += ["--config", args.eval_config] if args.eval_config else []
    out += [x for s in args.set for x in ("--set", s)]
    if lora:
        out += ["--set", f"sampling.lora={args.output / f'lora-{lora}'}"]
        if base_model:  # the LoRA's base (configs/gors-sd2.yaml), not the eval preset's SD 1.5
            out += ["--set", f"models.stable_diffusion={base_model}"]
    out += ["--limit", str(args.limit)] if args.limit else []
    out += ["--num-actors", str(args.num_actors)] if args.num_actors else []
    return out


def _eval_hours(folder: Path) -> float:
    from pipeline.finetune.data import inventory

    try:
        return inventory(str(folder / "run")).gpu_seconds / 3600
    except Exception:  # noqa: BLE001 - an evaluation with no accepted sample still has a cost; 0 is shown as such
        return 0.0


def rows_of(args: argparse.Namespace) -> tuple[tuple[str, str, str, str | None], ...]:
    """The evaluated rows: the four, and the cascade's GORS row after the inversion one with --cascade-run."""
    return (*ROWS[:3], CASCADE_ROW, *ROWS[3:]) if args.cascade_run else ROWS


def loras_of(args: argparse.Namespace) -> tuple[str, ...]:
    return ("sd", "inversion", "cascade") if args.cascade_run else ("sd", "inversion")


def table(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for key, label, generator, lora in rows_of(args):
        res = json.loads((args.output / "eval" / key / "results.json").read_text())
        row: dict[str, Any] = {"row": label, "generator": generator,
                               "scores": {c: res["categories"][c]["mean"] for c in res["categories"]},
                               "eval_device_hours": _eval_hours(args.output / "eval" / key)}
        if lora:
            card = json.loads((args.output / f"lora-{lora}" / "finetune.json").read_text())
            row |= {"accepted_pairs": card["runs"][0]["accepted"], "steps": card["steps"],
                    "data_device_hours": card["runs"][0]["data_device_hours"],
                    "training_device_hours": card["training_device_hours"], "base_model": card["base_model"]}
        rows.append(row)
    return {"categories": list(args.category), "rows": rows}


def markdown(t: dict[str, Any]) -> str:
    cols = [*COLUMNS, *(c for c in t["categories"] if c not in COLUMNS)]
    head = "| row | " + " | ".join(cols) + " | pairs | data GPU-h | train GPU-h | eval GPU-h |"
    lines = [head, "|---|" + "---|" * (len(cols) + 4)]
    for r in t["rows"]:
        cells = [f"{r['scores'][c]:.4f}" if c in r["scores"] else "-" for c in cols]
        hours = [f"{r[k]:.4f}" if k in r else "-" for k in ("data_device_hours", "training_device_hours",
                                                             "eval_device_hours")]
        extra = [str(r.get("accepted_pairs", "-")), *hours]
        lines.append(f"| {r['row']} | " + " | ".join(cells + extra) + " |")
    return "\n".join(lines) + "\n"


def _disconnect_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    from jobs import evaluate, finetune

    args = build_parser().parse_args(argv)
    fcfg = load_config(args.finetune_config or ["configs/gors.yaml"], args.set).finetune
    steps = [("finetune", w, finetune_args(args, w)) for w in loras_of(args)]
    steps += [("evaluate", key, eval_args(args, key, gen, lora, fcfg.base_model))
              for key, _, gen, lora in rows_of(args)]
    if args.dry_run:
        for job, _, cmd in steps:
            print(" ".join([f"python jobs/{job}.py", *cmd]))
        return EXIT_OK
    for job, what, cmd in steps:
        done = (args.output / f"lora-{what}" / "finetune.json" if job == "finetune"
                else args.output / "eval" / what / "results.json")
        if done.exists():
            continue
        code = (finetune.main if job == "finetune" else evaluate.main)(cmd)
        _disconnect_ray()  # a job on a cluster (RAY_ADDRESS) stays connected; the next job connects anew
        if code != EXIT_OK:
            return code
    t = table(args)
    (args.output / "table.json").write_text(json.dumps(t, indent=1))
    md = markdown(t)
    (args.output / "table.md").write_text(md)
    print(md)
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
