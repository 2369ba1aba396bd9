"""The T2I-CompBench protocol through the distributed job: val prompts x 10 images (seeds 42..51),
BLIP-VQA mean per category, printed in the shape of the paper's Table 3.

    python jobs/evaluate.py [--prompts-dir DIR] --category color [--category shape ...] --output DIR
        [--images-per-prompt 10] [--limit N] [--config FILE] [--set k=v ...] [--num-actors N]

``--prompts-dir`` is a folder in T2I-CompBench's ``examples/dataset`` layout (``{category}_val.txt``);
the default is the copy shipped in ``data/t2i-compbench``.
Writes ``results.json`` and ``results.md`` under ``--output``; the run itself is ``--output/run``
(rerun to resume). The table's header line says whether the scorer is exact (the run's record:
VQA weights, spaCy model and version, deviations from the benchmark).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow.parquet as pq  # noqa: E402

from jobs.cli import EXIT_OK, run_main  # noqa: E402
from jobs.prompts import prompt_table  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.io.compbench_data import COMPBENCH_DIR  # noqa: E402

BENCHMARK_FIRST_SEED = 42  # T2I-CompBench samples image k of a prompt with seed 42 + k
PAPER_TABLE3 = {"color": 0.8162, "shape": 0.6209, "texture": 0.7202}  # the paper's reported BLIP-VQA


def category_means(records: list[dict]) -> dict[str, dict[str, float]]:
    """Mean VQA score per category over every generated sample (failed ones count as 0)."""
    out: dict[str, dict[str, float]] = {}
    for cat in sorted({r["category"] for r in records if r["status"] != "invalid_input"}):
        recs = [r for r in records if r["category"] == cat and r["status"] != "invalid_input"]
        scores = [r["vqa_score"] if r["vqa_score"] is not None else 0.0 for r in recs]
        out[cat] = {"mean": sum(scores) / len(scores), "images": len(scores),
                    "failed": sum(r["status"] == "failed" for r in recs)}
    return out


def markdown_table(means: dict[str, dict[str, float]], scorer: dict | None = None) -> str:
    from pipeline.scoring.scorer_record import describe

    cats = list(means)
    head = "| Method | " + " | ".join(c.capitalize() for c in cats) + " |"
    sep = "|---|" + "---|" * len(cats)
    ours = "| referee-synth | " + " | ".join(f"{means[c]['mean']:.4f}" for c in cats) + " |"
    paper = "| paper (Table 3) | " + " | ".join(
        f"{PAPER_TABLE3[c]:.4f}" if c in PAPER_TABLE3 else "n/a" for c in cats) + " |"
    header = [describe(scorer), ""] if scorer else []
    return "\n".join([*header, head, sep, ours, paper]) + "\n"


def main(argv: list[str] | None = None) -> int:
    from jobs import synthesize
    from pipeline.io.reader import sidecar_records

    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n")[0])
    p.add_argument("--prompts-dir", type=Path, default=COMPBENCH_DIR,
                   help="folder of {category}_val.txt lists (default: the shipped data/t2i-compbench)")
    p.add_argument("--category", action="append", required=True)
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--images-per-prompt", type=int, default=10)
    p.add_argument("--limit", type=int, help="first N prompts of each category (smoke runs)")
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--num-actors", type=int)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    files = [args.prompts_dir / f"{c}_val.txt" for c in args.category]
    for f in files:
        if not f.is_file():
            raise UserError(f"evaluate: {f}: no such prompt file (expected {{category}}_val.txt in --prompts-dir)")
    table = prompt_table(files, args.limit, seed=BENCHMARK_FIRST_SEED)
    args.output.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, args.output / "prompts.parquet")
    job = ["--prompts", str(args.output / "prompts.parquet"), "--output", str(args.output / "run"),
           "--samples-per-prompt", str(args.images_per_prompt), "--threshold", "0"]
    job += ["--config", args.config] if args.config else []
    job += [x for s in args.set for x in ("--set", s)]
    job += ["--num-actors", str(args.num_actors)] if args.num_actors else []
    job += ["--no-progress"] if args.no_progress else []
    code = synthesize.main(job)
    if code != EXIT_OK:
        return code
    means = category_means(sidecar_records(str(args.output / "run")))
    scorer = json.loads((args.output / "run" / "run.json").read_text()).get("scorer", {})
    md = markdown_table(means, scorer)
    (args.output / "results.md").write_text(md)
    (args.output / "results.json").write_text(json.dumps(
        {"protocol": "T2I-CompBench BLIP-VQA", "images_per_prompt": args.images_per_prompt,
         "first_seed": BENCHMARK_FIRST_SEED, "limit": args.limit, "categories": means,
         "paper_table3": PAPER_TABLE3, "scorer": scorer}, indent=1))
    print(md)
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
