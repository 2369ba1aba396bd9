"""The T2I-CompBench protocol through the distributed job: val prompts x 10 images (seeds 42..51),
each category's mean by its scorer, printed in the shape of the paper's Table 3.

    python jobs/evaluate.py [--prompts-dir DIR] --category color [--category shape ...] --output DIR
        [--images-per-prompt 10] [--limit N] [--config FILE] [--set k=v ...] [--num-actors N]

``--prompts-dir`` is a folder in T2I-CompBench's ``examples/dataset`` layout (``{category}_val.txt``);
the default is the copy shipped in ``data/t2i-compbench``.
Categories: the six Table-3 columns (color, shape, texture: BLIP-VQA; spatial: the benchmark's
rule on an OWLv2 detector; non_spatial: CLIPScore; complex: 3-in-1) and the benchmark's other
lists (numeracy, 3d_spatial: judged by ``scoring.default``, not by the benchmark's own method).
The spatial column matches nouns against UniDet's label names as the benchmark does
(``scoring.spatial_vocabulary=unidet``: a prompt naming an object outside them scores 0, so the column
is comparable with published tables); ``--set scoring.spatial_vocabulary=open`` finds any noun.
Writes ``results.json`` and ``results.md`` under ``--output``; the run itself is ``--output/run``
(rerun to resume). The table always has the six columns (``-`` where not run) and a row of
exactness labels; above it, the BLIP-VQA record (weights, spaCy, deviations) and every other
scorer's deviations.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow.parquet as pq  # noqa: E402

from jobs.cli import EXIT_OK, existing_parent, run_main  # noqa: E402
from jobs.prompts import prompt_table  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.io.compbench_data import COMPBENCH_DIR  # noqa: E402

EVALUATE_SPATIAL_VOCABULARY = "unidet"  # the benchmark's: its spatial column compares with published tables
BENCHMARK_FIRST_SEED = 42  # T2I-CompBench samples image k of a prompt with seed 42 + k
# Table 3's columns, its groups, and the paper's own row ("OUR METHOD").
TABLE3_COLUMNS = ("color", "shape", "texture", "spatial", "non_spatial", "complex")
TABLE3_GROUPS = ("Attribute binding", "", "", "Object relationship", "", "Complex")
TABLE3_TITLES = {"color": "Color", "shape": "Shape", "texture": "Texture", "spatial": "Spatial",
                 "non_spatial": "Non-spatial", "complex": "Complex", "3d_spatial": "3D-spatial",
                 "numeracy": "Numeracy"}
PAPER_TABLE3 = {"color": 0.8162, "shape": 0.6209, "texture": 0.7202, "spatial": 0.1506, "non_spatial": 0.3215,
                "complex": 0.3529}


def category_means(records: list[dict]) -> dict[str, dict[str, Any]]:
    """Mean score per category over every generated sample (failed ones count as 0), with its scorer."""
    out: dict[str, dict[str, Any]] = {}
    for cat in sorted({r["category"] for r in records if r["status"] != "invalid_input"}):
        recs = [r for r in records if r["category"] == cat and r["status"] != "invalid_input"]
        scores = [r["vqa_score"] if r["vqa_score"] is not None else 0.0 for r in recs]
        scorers = sorted({r.get("scorer") for r in recs if r.get("scorer")})
        out[cat] = {"mean": sum(scores) / len(scores), "images": len(scores),
                    "failed": sum(r["status"] == "failed" for r in recs), "scorer": ", ".join(scorers) or None}
    return out


def columns(means: dict[str, Any]) -> list[str]:
    """Table 3's six columns, then any other category evaluated."""
    return [*TABLE3_COLUMNS, *sorted(c for c in means if c not in TABLE3_COLUMNS)]


def column_label(cat: str, scorer: dict) -> str:
    """The exactness label of the scorer that judges ``cat`` (from the run's record)."""
    from pipeline.scoring.routing import UNSUPPORTED

    routing = scorer.get("by_category", {})
    name = routing.get(cat, routing.get("default"))
    label = scorer.get("scorers", {}).get(name, {}).get("label", name or "?")
    if cat in TABLE3_COLUMNS:
        return label
    return f"{label} (not the benchmark's method: {UNSUPPORTED.get(cat, 'not a T2I-CompBench category')})"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(means: dict[str, dict[str, Any]], scorer: dict | None = None) -> str:
    from pipeline.scoring.scorer_record import describe

    scorer = scorer or {}
    cats = columns(means)
    groups = [*TABLE3_GROUPS, *("Other" if i == 0 else "" for i, _ in enumerate(cats[len(TABLE3_COLUMNS):]))]
    rows = [
        _row(["", *groups]),
        "|---|" + "---|" * len(cats),
        _row(["Model", *(TABLE3_TITLES.get(c, c) for c in cats)]),
        _row(["referee-synth", *(f"{means[c]['mean']:.4f}" if c in means else "-" for c in cats)]),
        _row(["paper: our method (Table 3)", *(f"{PAPER_TABLE3[c]:.4f}" if c in PAPER_TABLE3 else "-" for c in cats)]),
        _row(["scorer", *(column_label(c, scorer) for c in cats)]),
    ]
    header = [describe(scorer)] if "exact" in scorer else []
    for name, rec in sorted(scorer.get("scorers", {}).items()):
        if name != "blip_vqa":
            devs = "; ".join(rec["deviations"]) or "none"
            header.append(f"{rec['label']}: deviations: {devs}")
    return "\n".join([*header, "", *rows] if header else rows) + "\n"


def check_args(args: argparse.Namespace) -> None:
    """Before any work: counts that mean what they say, and an output that can be a folder."""
    if args.limit is not None and args.limit < 1:
        raise UserError(f"evaluate: --limit must be at least 1 (prompts per category), got {args.limit}")
    if args.images_per_prompt < 1:
        raise UserError(f"evaluate: --images-per-prompt must be at least 1, got {args.images_per_prompt}")
    if args.output.exists() and not args.output.is_dir():
        raise UserError(f"evaluate: --output {args.output} is a file; give a folder")
    existing_parent(args.output, "evaluate: ")


def main(argv: list[str] | None = None) -> int:
    from jobs import synthesize
    from pipeline.io.reader import sidecar_records

    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n")[0])
    p.add_argument("--prompts-dir", type=Path, default=COMPBENCH_DIR,
                   help="folder of {category}_val.txt lists (default: the shipped data/t2i-compbench)")
    p.add_argument("--category", action="append", required=True)
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--images-per-prompt", type=int, default=10)
    p.add_argument("--limit", type=int, help="first N prompts of each category (smoke runs; N >= 1)")
    p.add_argument("--config", action="append", default=[],
                   help="YAML preset; repeat to layer presets (later ones win key by key), as synthesize.py does")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--num-actors", type=int)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    check_args(args)
    files = [args.prompts_dir / f"{c}_val.txt" for c in args.category]
    for f in files:
        if not f.is_file():
            known = sorted(p.name[:-len("_val.txt")] for p in args.prompts_dir.glob("*_val.txt"))
            raise UserError(f"evaluate: {f}: no such prompt file (expected {{category}}_val.txt in --prompts-dir; "
                            f"there: {', '.join(known) or 'none'})")
    table = prompt_table(files, args.limit, seed=BENCHMARK_FIRST_SEED)
    args.output.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, args.output / "prompts.parquet")
    job = ["--prompts", str(args.output / "prompts.parquet"), "--output", str(args.output / "run"),
           "--samples-per-prompt", str(args.images_per_prompt), "--threshold", "0"]
    job += [x for c in args.config for x in ("--config", c)]
    # The benchmark's vocabulary unless the user's own --set (later, so it wins) says otherwise.
    job += ["--set", f"scoring.spatial_vocabulary={EVALUATE_SPATIAL_VOCABULARY}"]
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
        {"protocol": "T2I-CompBench (each category by its scorer)", "images_per_prompt": args.images_per_prompt,
         "first_seed": BENCHMARK_FIRST_SEED, "limit": args.limit, "categories": means,
         "labels": {c: column_label(c, scorer) for c in columns(means)},
         "paper_table3": PAPER_TABLE3, "scorer": scorer}, indent=1))
    print(md)
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
