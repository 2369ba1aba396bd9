"""Turn T2I-CompBench prompt files (one prompt a line) into a prompt table (Parquet).

    python jobs/prompts.py --output prompts.parquet color_val.txt shape_val.txt [--limit N] [--seed S]

The category comes from the file name (``color_val.txt`` -> ``color``); prompt ids are
``{category}_{line:05d}`` (unique across files of different categories).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from jobs.cli import run_main  # noqa: E402
from pipeline.errors import UserError  # noqa: E402

_SPLIT_SUFFIX = re.compile(r"_(train|val|test)$")


def category_of(path: Path) -> str:
    return _SPLIT_SUFFIX.sub("", path.stem)


def read_prompt_file(path: Path, limit: int | None = None) -> list[str]:
    if not path.is_file():
        raise UserError(f"prompts: {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"prompts: {path}: not UTF-8 text") from None
    prompts = [line.strip() for line in lines if line.strip()]
    return prompts[:limit] if limit else prompts


def prompt_table(files: list[Path], limit: int | None = None, seed: int | None = None) -> pa.Table:
    cols: dict[str, list] = {"prompt": [], "prompt_id": [], "category": []}
    for path in files:
        cat = category_of(path)
        for i, prompt in enumerate(read_prompt_file(path, limit)):
            cols["prompt"].append(prompt)
            cols["prompt_id"].append(f"{cat}_{i:05d}")
            cols["category"].append(cat)
    if seed is not None:
        cols["seed"] = [seed] * len(cols["prompt"])
    return pa.table(cols)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prompts.py", description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="T2I-CompBench prompt files")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--limit", type=int, help="first N prompts of each file")
    p.add_argument("--seed", type=int, help="base seed for every row (samples get seed, seed+1, ...)")
    args = p.parse_args(argv)
    table = prompt_table(args.files, args.limit, args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, args.output)
    print(f"wrote {table.num_rows} prompts to {args.output}")
    return 0


if __name__ == "__main__":
    run_main(main)
