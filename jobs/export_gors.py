"""Export a run as the layout T2I-CompBench's GORS finetuning reads.

    python jobs/export_gors.py --run RUN_DIR --output DIR [--include-rejected] [--map-unsafe] [--generator G ...]

Writes ``DIR/samples/{prompt}_{idx:06d}.png`` (idx runs over the whole export, in the run's
order, which is the benchmark's for tables made by jobs/prompts.py), ``DIR/reward/vqa_result.json``
(``[{"question_id": idx, "answer": A}]`` in the same order, A as the benchmark's scorer writes it:
BLIP-VQA's ``"0.xxxx"`` string, the raw float of CLIPScore, the spatial rule and 3-in-1, so that GORS's
``float32(A) > threshold`` selects exactly what the run accepted) and ``DIR/dataset.txt``.
GORS picks a prompt's threshold by its index in dataset.txt (``index < 560``: template), so when
the exported prompts come from one T2I-CompBench list, dataset.txt is that list verbatim (other
prompts after it): GORS's rule then gives every prompt the threshold the run selected it with.
Otherwise dataset.txt holds the exported prompts, one a line per sample. GORS takes the prompt
back by splitting the file name at ``_``, so a prompt holding ``_``, ``/`` or a character a file
system refuses cannot be written faithfully: it is reported and skipped, or, with
``--map-unsafe``, written with those characters replaced by spaces (the reported mapping goes
to ``DIR/mapped_prompts.jsonl``; names are cut to fit the file system's 255-byte limit, in UTF-8
bytes). ``--generator`` (repeatable) exports only the samples that generator made (a cascade's
``sd_sampling`` or ``inversion`` part). The export is built in a temporary folder beside DIR and renamed
at the end: DIR is whole or absent, and a rerun after a failure starts clean.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.cli import existing_parent, run_main  # noqa: E402
from pipeline.config import GENERATORS, ConfigError, FilterConfig  # noqa: E402
from pipeline.config_loading import from_dict  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.io import storage  # noqa: E402
from pipeline.io.compbench_data import COMPBENCH_DIR, TEMPLATE_PROMPTS  # noqa: E402
from pipeline.io.completeness import read_run, run_config_hash  # noqa: E402
from pipeline.io.reader import sample_generator, shard_images, sidecar_records  # noqa: E402
from pipeline.scoring.filter import threshold_for  # noqa: E402
from schemas.gors import reward_answer  # noqa: E402

# Characters GORS or a common file system cannot carry in a file name.
_UNSAFE = re.compile(r'[_/\\\x00-\x1f<>:"|?*]')
_MAX_NAME_BYTES = 240  # ext4 and most others stop at 255 bytes per name


def prompt_problem(prompt: str) -> str | None:
    if _UNSAFE.search(prompt):
        return "holds '_', '/', or a character file systems refuse"
    if prompt.strip() != prompt or prompt in (".", ".."):
        return "has leading/trailing spaces or is a dot name"
    if len(prompt.encode()) > _MAX_NAME_BYTES:
        return "is too long for a file name"
    return None


def mapped(prompt: str) -> str:
    """The prompt with unsafe characters as spaces, cut to _MAX_NAME_BYTES UTF-8 bytes (never mid-character)."""
    name = re.sub(r"\s+", " ", _UNSAFE.sub(" ", prompt)).strip()
    cut = name.encode()[:_MAX_NAME_BYTES].decode("utf-8", errors="ignore").strip()
    return cut if cut not in ("", ".", "..") else "prompt"


def _to_png(data: bytes) -> bytes:
    import io

    from PIL import Image

    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return data
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def export(run: str, output: Path, include_rejected: bool, map_unsafe: bool,
           generators: list[str] | None = None) -> dict[str, int]:
    """Shard by shard in key order, so memory holds one shard's images at a time. ``generators``: only their
    samples; None: all."""
    wanted = ("accepted", "rejected") if include_rejected else ("accepted",)
    fs, out, scan = read_run(run, "export")  # the completeness rule the resume applies
    records = [r for r in sidecar_records(run, shards=scan.shards) if r["status"] in wanted
               and (generators is None or sample_generator(r) in generators)]
    samples_dir = output / "samples"
    samples_dir.mkdir(parents=True, exist_ok=True)
    rewards, exported, mapped_rows = [], [], []
    counts = {"skipped": 0, "no_image": 0}
    for shard in sorted({r["shard"] for r in records}):
        recs = [r for r in records if r["shard"] == shard]
        images = dict(shard_images(fs, out, shard, {r["key"] for r in recs}))
        for rec in recs:
            if rec["key"] not in images:  # rejected samples of a run without keep_rejected_images
                counts["no_image"] += 1
                continue
            problem = prompt_problem(rec["prompt"])
            if problem and not map_unsafe:
                print(f"skipped {rec['key']}: prompt {rec['prompt']!r} {problem}", file=sys.stderr)
                counts["skipped"] += 1
                continue
            name = mapped(rec["prompt"]) if problem else rec["prompt"]
            if problem:
                mapped_rows.append({"key": rec["key"], "prompt": rec["prompt"], "written_as": name})
            idx = len(rewards)
            _write(samples_dir / f"{name}_{idx:06d}.png", _to_png(images[rec["key"]]))
            rewards.append({"question_id": idx, "answer": reward_answer(rec.get("scorer"), rec["vqa_score"])})
            exported.append((name, rec))
    if counts["no_image"]:
        print(f"note: {counts['no_image']} samples have no stored image and are left out", file=sys.stderr)
    (output / "reward").mkdir(exist_ok=True)
    _write(output / "reward" / "vqa_result.json", json.dumps(rewards).encode())
    lines = dataset_lines(exported)
    _check_index_rule(lines, exported, _run_filter(fs, out))
    _write(output / "dataset.txt", ("\n".join(lines) + "\n" if lines else "").encode())
    if mapped_rows:
        _write(output / "mapped_prompts.jsonl", "".join(json.dumps(m) + "\n" for m in mapped_rows).encode())
    return {"exported": len(rewards), "skipped": counts["skipped"], "mapped": len(mapped_rows)}


def benchmark_list(rec: dict) -> str | None:
    """The shipped T2I-CompBench list a record's prompt sits in at its benchmark_index, if any."""
    idx, cat = rec.get("benchmark_index"), rec.get("category")
    if idx is None or not cat:
        return None
    for split in ("train", "val"):
        path = COMPBENCH_DIR / f"{cat}_{split}.txt"
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        if idx < len(lines) and lines[idx].strip() == rec["prompt"]:
            return path.name
    return None


def dataset_lines(exported: list[tuple[str, dict]]) -> list[str]:
    """dataset.txt for (written prompt, record) pairs: the benchmark list when there is one."""
    lists = {name for name in (benchmark_list(rec) for _, rec in exported) if name}
    if len(lists) != 1:
        if lists:
            print(f"note: the export mixes {len(lists)} T2I-CompBench lists; GORS trains one category at a time "
                  "(its index rule needs one list per export)", file=sys.stderr)
        return [name for name, _ in exported]
    lines = (COMPBENCH_DIR / lists.pop()).read_text(encoding="utf-8").splitlines()
    known = set(lines)
    for name, _ in exported:
        if name not in known:
            known.add(name)
            lines.append(name)
    return lines


def _check_index_rule(lines: list[str], exported: list[tuple[str, dict]], fcfg: FilterConfig) -> None:
    """Say when GORS's own rule on dataset.txt would pick another threshold than the run did."""
    first: dict[str, int] = {}
    for i, line in enumerate(lines):
        first.setdefault(line, i)
    off = sum(
        threshold_for(rec["category"], fcfg, first[name] < TEMPLATE_PROMPTS) != rec.get("threshold")
        for name, rec in exported if rec.get("threshold") is not None
    )
    if off:
        print(f"note: {off} exported samples would get the other threshold from GORS's index < {TEMPLATE_PROMPTS} "
              "rule on dataset.txt than the run selected them with", file=sys.stderr)


def _run_filter(fs: object, out: str) -> FilterConfig:
    """The run's filter settings (run.json was read whole by ``read_run``; its config may still be damaged)."""
    run = json.loads(storage.read_bytes(fs, storage.join(out, "run.json")))
    config = run.get("config") if isinstance(run, dict) else None
    if not isinstance(config, dict):
        raise UserError(f"export: {out}/run.json holds no config mapping (damaged?)")
    try:
        return from_dict(config).filter
    except ConfigError as err:
        raise UserError(f"export: {out}/run.json: {err}") from None


def _write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def check_output(output: Path) -> None:
    """Before any work: the export needs a new (or empty) folder whose parent can take it."""
    if not str(output).strip():
        raise UserError("export: --output is empty; give a folder path")
    if output.is_file() or output.is_symlink() and not output.is_dir():
        raise UserError(f"export: --output {output} is a file; give a new folder")
    if output.is_dir() and any(output.iterdir()):
        raise UserError(f"export: --output {output} is not empty; choose a new --output")
    existing_parent(output, "export: ")


def export_whole(run: str, output: Path, include_rejected: bool, map_unsafe: bool,
                 generators: list[str] | None = None) -> dict[str, int]:
    """Build the export in a temporary folder beside ``output``, then rename it into place."""
    output = output.resolve()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"export: --output {output}: cannot create its folder ({err.strerror or err})") from None
    tmp = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        selection = {"generators": generators} if generators else {}  # none: export's call as it always was
        counts = export(run, tmp, include_rejected, map_unsafe, **selection)
        if output.is_dir():
            output.rmdir()  # empty (checked): the rename takes its place
        os.replace(tmp, output)
    except OSError as err:
        raise UserError(f"export: writing {output} failed, nothing was left there ({err.strerror or err})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="export_gors.py", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run folder written by jobs/synthesize.py")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--include-rejected", action="store_true", help="also rejected samples that have images")
    p.add_argument("--map-unsafe", action="store_true", help="write unsafe prompts with those characters as spaces")
    p.add_argument("--generator", action="append", choices=GENERATORS,
                   help="only the samples this generator made (repeatable; default: all)")
    args = p.parse_args(argv)
    fs, out = storage.filesystem_for(args.run)
    try:
        run_config_hash(fs, out, args.run)  # a missing or damaged run.json: one line before any work
    except UserError as err:
        raise UserError(f"export: {err}") from None
    check_output(args.output)
    counts = export_whole(args.run, args.output, args.include_rejected, args.map_unsafe, args.generator)
    print(f"exported {counts['exported']} samples to {args.output} "
          f"({counts['skipped']} skipped, {counts['mapped']} mapped)")
    return 0


if __name__ == "__main__":
    run_main(main)
