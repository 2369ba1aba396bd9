"""Turn T2I-CompBench prompt files (one prompt a line) into a prompt table (Parquet).

    python jobs/prompts.py --output prompts.parquet color_train.txt shape_val.txt [--limit N] [--seed S]

The category comes from the file name (``color_val.txt`` -> ``color``); prompt ids are
``{file name without .txt}_{n:05d}`` (``color_val_00000``): stable, and unique across the files of
one call (two files of the same name are refused). A file that is one of
the benchmark's lists (same name and same lines as the copy in data/t2i-compbench) also fills
``benchmark_index`` (the prompt's line, 0-based) and ``template`` (a template prompt of a train
list: GORS's ``index < 560`` rule), so the gors preset applies the template thresholds on its own.
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

from jobs.cli import existing_parent, run_main  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.io.compbench_data import COMPBENCH_DIR, TRAIN_SUFFIX, template_flags  # noqa: E402

_SPLIT_SUFFIX = re.compile(r"_(train|val|test)$")


def category_of(path: Path) -> str:
    return _SPLIT_SUFFIX.sub("", path.stem)


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"prompts: {path}: no such file")
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte-order mark is not text
    except UnicodeDecodeError:
        raise UserError(f"prompts: {path}: not UTF-8 text") from None
    except OSError as err:
        raise UserError(f"prompts: {path}: cannot read ({err.strerror or err})") from None


def read_prompt_lines(path: Path, limit: int | None = None) -> list[tuple[int, str]]:
    """(line index, prompt) of the non-empty lines, the first ``limit`` of them."""
    found = [(i, line.strip()) for i, line in enumerate(_lines(path)) if line.strip()]
    return found[:limit] if limit else found


def read_prompt_file(path: Path, limit: int | None = None) -> list[str]:
    return [prompt for _, prompt in read_prompt_lines(path, limit)]


def benchmark_templates(path: Path) -> list[bool] | None:
    """Template flags per line when ``path`` is a shipped T2I-CompBench list, else None."""
    shipped = COMPBENCH_DIR / path.name
    if not shipped.is_file():
        return None
    lines = _lines(path)
    if lines != shipped.read_text(encoding="utf-8").splitlines():
        print(f"note: {path} is named like a T2I-CompBench list but differs from it: no benchmark index "
              "or template flag", file=sys.stderr)
        return None
    return template_flags(lines, train=path.stem.endswith(TRAIN_SUFFIX))


def prompt_table(files: list[Path], limit: int | None = None, seed: int | None = None) -> pa.Table:
    cols: dict[str, list] = {"prompt": [], "prompt_id": [], "category": [], "benchmark_index": [], "template": []}
    _check_distinct_names(files)
    for path in files:
        cat = category_of(path)
        templates = benchmark_templates(path)
        for i, (line, prompt) in enumerate(read_prompt_lines(path, limit)):
            cols["prompt"].append(prompt)
            cols["prompt_id"].append(f"{path.stem}_{i:05d}")
            cols["category"].append(cat)
            cols["benchmark_index"].append(line if templates is not None else None)
            cols["template"].append(templates[line] if templates is not None else False)
    if seed is not None:
        cols["seed"] = [seed] * len(cols["prompt"])
    types = {"benchmark_index": pa.int64(), "template": pa.bool_()}
    return pa.table({k: pa.array(v, type=types.get(k)) for k, v in cols.items()})


def _check_distinct_names(files: list[Path]) -> None:
    """Ids come from the file name: two files of one name would give the same ids."""
    seen: dict[str, Path] = {}
    for path in files:
        if path.stem in seen:
            raise UserError(f"prompts: {seen[path.stem]} and {path} have the same name, so their prompt ids would "
                            "collide; rename one or make two tables")
        seen[path.stem] = path


def check_args(args: argparse.Namespace) -> None:
    """Every flag and the output path before any work: one line each."""
    if args.seed is not None and not INT64_MIN <= args.seed <= INT64_MAX:
        raise UserError(f"--seed must fit int64 ({INT64_MIN} to {INT64_MAX}), got {args.seed}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    out: Path = args.output
    if not str(out).strip():
        raise UserError("--output is empty; give a file path")
    if out.is_dir():
        raise UserError(f"--output {out} is a folder; give a file path such as {out / 'prompts.parquet'}")
    existing_parent(out)


def _write_table(table: pa.Table, out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        pq.write_table(table, tmp)
        tmp.replace(out)  # readers never see half a table
    except OSError as err:
        raise UserError(f"--output {out}: cannot write ({err.strerror or err})") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prompts.py", description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="T2I-CompBench prompt files")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--limit", type=int, help="first N prompts of each file")
    p.add_argument("--seed", type=int, help="base seed for every row (samples get seed, seed+1, ...)")
    args = p.parse_args(argv)
    check_args(args)
    table = prompt_table(args.files, args.limit, args.seed)
    _write_table(table, args.output)
    templates = sum(table.column("template").to_pylist())
    print(f"wrote {table.num_rows} prompts to {args.output} ({templates} benchmark template prompts)")
    return 0


if __name__ == "__main__":
    run_main(main)
