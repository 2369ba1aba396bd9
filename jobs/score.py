"""Score images with BLIP-VQA exactly as T2I-CompBench does, and write its result files.

    python jobs/score.py --images DIR --output DIR [--category NAME] [--config FILE] [--set k=v ...]
    python jobs/score.py --shards RUN_DIR --output DIR [--config FILE] [--set k=v ...]

``--images`` reads a T2I-CompBench samples folder (``{prompt}_{idx:06d}.png``, ordered by idx);
``--shards`` reads the accepted samples of a run's ``RUN_DIR/shards/*.tar``. Writes
``vqa_result.json`` (the benchmark's ``[{"question_id": i, "answer": "0.xxxx"}]``, one entry per
image in order; an unreadable image gets "0.0000" so later entries stay aligned, as GORS needs),
``scores.jsonl`` (one line per image) and ``score_summary.json``; prints the mean score.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs.cli import run_main  # noqa: E402
from pipeline.errors import UserError  # noqa: E402

_NAME = re.compile(r"^(?P<prompt>.*)_(?P<idx>\d+)\.(?P<ext>png|jpe?g|webp)$", re.IGNORECASE)
_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


@dataclass
class Sample:
    name: str  # file name, or "SHARD.tar:KEY.png"
    prompt: str | None
    open_image: Callable[[], Any]  # -> PIL image; raises on unreadable data
    category: str | None = None
    key: str | None = None


# --- inputs -----------------------------------------------------------------------------------


def folder_samples(folder: Path, category: str | None) -> list[Sample]:
    """A samples folder's images ordered by the integer after the last ``_`` (the benchmark's order)."""
    from PIL import Image

    if not folder.is_dir():
        raise UserError(f"images folder not found: {folder}")
    found: list[tuple[int, Sample]] = []
    for path in folder.iterdir():
        m = _NAME.match(path.name)
        if not m or not path.is_file():
            continue
        opener = (lambda p: lambda: Image.open(p))(path)
        found.append((int(m["idx"]), Sample(path.name, m["prompt"], opener, category)))
    if not found:
        raise UserError(f"no images named PROMPT_IDX.png in {folder}")
    with_underscore = sum("_" in s.prompt for _, s in found if s.prompt)
    if with_underscore:
        print(f"note: {with_underscore} prompts hold '_'; read as everything before the last '_' "
              "(T2I-CompBench's own reader stops at the first)", file=sys.stderr)
    return [s for _, s in sorted(found, key=lambda t: t[0])]


def _tar_groups(tar_path: Path) -> dict[str, dict[str, tarfile.TarInfo]]:
    """WebDataset grouping: key = member name up to its first dot, ext = the rest."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    with tarfile.open(tar_path) as tar:
        for info in tar.getmembers():
            if info.isfile() and "." in info.name:
                key, ext = info.name.split(".", 1)
                groups.setdefault(key, {})[ext.lower()] = info
    return groups


def _read_member(tar_path: Path, info: tarfile.TarInfo) -> bytes:
    with tarfile.open(tar_path) as tar:
        f = tar.extractfile(info)
        return f.read() if f else b""


def _shard_sample(tar_path: Path, key: str, members: dict[str, tarfile.TarInfo]) -> Sample | None:
    from PIL import Image

    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            meta = json.loads(_read_member(tar_path, members["json"]))
        except ValueError:
            meta = {}
    if meta.get("status", "accepted") != "accepted":
        return None
    prompt = _read_member(tar_path, members["txt"]).decode("utf-8") if "txt" in members else meta.get("prompt")
    ext = next((e for e in _IMAGE_EXTS if e in members), None)

    def opener() -> Any:
        if ext is None:
            raise OSError("no image member")
        return Image.open(io.BytesIO(_read_member(tar_path, members[ext])))

    name = f"{tar_path.name}:{key}.{ext or 'png'}"
    return Sample(name, prompt, opener, meta.get("category"), key)


def shard_samples(run_dir: Path) -> list[Sample]:
    """Accepted samples of a run's tar shards, in shard then key order."""
    tars = sorted((run_dir / "shards").glob("*.tar")) if run_dir.is_dir() else []
    if not tars:
        raise UserError(f"no shards/*.tar in run folder {run_dir}")
    samples: list[Sample] = []
    for tar_path in tars:
        try:
            groups = _tar_groups(tar_path)
        except (tarfile.TarError, OSError) as err:
            raise UserError(f"{tar_path}: not a readable tar ({err})") from None
        for key in sorted(groups):
            sample = _shard_sample(tar_path, key, groups[key])
            if sample is not None:
                samples.append(sample)
    return samples


# --- scoring ----------------------------------------------------------------------------------


def _load(sample: Sample, scorer: Any) -> tuple[Any, str | None]:
    """(3xSxS tensor, None) or (None, why it is unreadable)."""
    if not sample.prompt:
        return None, "no prompt"
    try:
        with sample.open_image() as img:
            return scorer.load_pil(img), None
    except Exception as err:  # PIL raises many types for bad data (OSError, ValueError, SyntaxError...)
        return None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")


def _record(i: int, sample: Sample, questions: list[str], result: Any, error: str | None, cfg: Any) -> dict:
    from pipeline.filter import decide

    rec: dict[str, Any] = {
        "index": i, "image": sample.name, "key": sample.key, "prompt": sample.prompt,
        "category": sample.category, "questions": questions,
    }
    if result is None:
        return {**rec, "answers": [], "score": None, "status": "unreadable", "error": error,
                "threshold": None, "accepted": None}
    decision = decide(result.score, sample.category, cfg.filter)
    return {**rec, "answers": result.answers, "score": result.score, "status": "scored", "error": None,
            "threshold": decision.threshold, "accepted": decision.accepted}


def score_samples(samples: list[Sample], scorer: Any, cfg: Any) -> Iterator[dict]:
    """One record per sample, in order; unreadable ones get a status and a line on stderr."""
    from tqdm import tqdm

    step = cfg.vqa.image_batch_size
    with tqdm(total=len(samples), unit="img", desc="BLIP-VQA", file=sys.stderr, dynamic_ncols=True) as bar:
        for start in range(0, len(samples), step):
            batch = samples[start : start + step]
            loaded = [_load(s, scorer) for s in batch]
            ok = [k for k, (img, _) in enumerate(loaded) if img is not None]
            results = scorer.score([loaded[k][0] for k in ok], [batch[k].prompt for k in ok])
            by_pos = dict(zip(ok, results))
            for k, sample in enumerate(batch):
                res = by_pos.get(k)
                if res is None:
                    bar.write(f"unreadable: {sample.name} ({loaded[k][1]})", file=sys.stderr)
                questions = res.questions if res else (scorer.questions([sample.prompt])[0] if sample.prompt else [])
                yield _record(start + k, sample, questions, res, loaded[k][1], cfg)
            bar.update(len(batch))


# --- outputs ----------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path`` and rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_outputs(out: Path, records: list[dict], summary: dict, digits: int) -> None:
    from pipeline.vqa import format_score

    out.mkdir(parents=True, exist_ok=True)
    vqa = [{"question_id": r["index"], "answer": format_score(r["score"] or 0.0, digits)} for r in records]
    write_atomic(out / "vqa_result.json", json.dumps(vqa))
    write_atomic(out / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    write_atomic(out / "score_summary.json", json.dumps(summary, indent=2) + "\n")


def summarize(records: list[dict], scorer: Any, cfg: Any, source: str) -> dict:
    scores = [r["score"] for r in records if r["status"] == "scored"]
    return {
        "source": source,
        "images": len(records),
        "scored": len(scores),
        "unreadable": len(records) - len(scores),
        "mean_score": sum(scores) / len(scores) if scores else None,
        "scorer": scorer.metadata,
        "config_hash": cfg.hash(),
    }


# --- entry point ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="score.py", description=__doc__.split("\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="T2I-CompBench samples folder ({prompt}_{idx:06d}.png)")
    src.add_argument("--shards", type=Path, metavar="RUN_DIR", help="run folder; scores RUN_DIR/shards/*.tar")
    parser.add_argument("--output", required=True, type=Path, help="folder for vqa_result.json and scores.jsonl")
    parser.add_argument("--category", default=None, help="category for the filter thresholds (--images only)")
    parser.add_argument("--config", type=Path, default=None, help="YAML preset (default: paper settings)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.images is not None:
        samples, source = folder_samples(args.images, args.category), str(args.images)
    else:
        samples, source = shard_samples(args.shards), str(args.shards)

    from pipeline.models import load_vqa_models
    from pipeline.vqa import VqaScorer

    scorer = VqaScorer(load_vqa_models(cfg), cfg)
    records = list(score_samples(samples, scorer, cfg))
    summary = summarize(records, scorer, cfg, source)
    write_outputs(args.output, records, summary, cfg.vqa.round_digits)
    mean = summary["mean_score"]
    shown = f"{mean:.{cfg.vqa.round_digits}f}" if mean is not None else "n/a"
    print(f"BLIP-VQA score: {shown} ({summary['scored']} images scored, {summary['unreadable']} unreadable)")
    return 0


if __name__ == "__main__":
    run_main(main)
