"""Score images as T2I-CompBench does (each category by its scorer), and write its result files.

    python jobs/score.py --images DIR --output DIR [--category NAME] [--prompt-split last|first]
        [--config FILE] [--set k=v ...]
    python jobs/score.py --shards RUN_DIR --output DIR [--config FILE] [--set k=v ...]

``--images`` reads a T2I-CompBench samples folder (``{prompt}_{idx:06d}.png``, ordered by idx);
the prompt is the name up to the last ``_`` (benchmark prompts hold none; rows whose prompt holds
one are marked), or, with ``--prompt-split first``, up to the first ``_`` exactly as the benchmark
reads it. ``--shards`` reads the accepted samples of a run's ``RUN_DIR/shards/*.tar``, with their
benchmark template flags. Every image is scored alone, as the run scored it when it was stored,
so a run's stored scores are reproduced to the digit. The scorer is the category's
(``scoring.by_category``: BLIP-VQA for attributes, the spatial rule on OWLv2, CLIPScore, 3-in-1; a
folder's category is ``--category``, a run's is each sample's). Writes
``vqa_result.json`` (the benchmark's ``[{"question_id": i, "answer": ...}]``, one entry per image in
order: BLIP-VQA's "0.xxxx" string, the other scorers' raw float as their scripts write it; an
unreadable image gets a zero so later entries stay aligned, as GORS needs),
``scores.jsonl`` (one line per image) and ``score_summary.json`` (with the scorer's exactness
record); prints the mean score and whether the scorer is exact.
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

from jobs.cli import existing_parent, run_main  # noqa: E402
from pipeline.errors import UserError  # noqa: E402

_NAME = re.compile(r"^(?P<prompt>.*)_(?P<idx>\d+)\.(?P<ext>png|jpe?g|webp)$", re.IGNORECASE)
_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
SCORE_NAMES = {"blip_vqa": "BLIP-VQA", "clipscore": "CLIPScore", "spatial_detector": "Spatial",
               "three_in_one": "3-in-1"}


@dataclass
class Sample:
    name: str  # file name, or "SHARD.tar:KEY.png"
    prompt: str | None
    open_image: Callable[[], Any]  # -> PIL image; raises on unreadable data
    category: str | None = None
    key: str | None = None
    template: bool = False  # a benchmark template prompt (from the run's metadata)
    underscore: bool = False  # the file name's prompt part holds '_' (read up to the last one)


# --- inputs -----------------------------------------------------------------------------------


def folder_samples(folder: Path, category: str | None, prompt_split: str = "last") -> list[Sample]:
    """A samples folder's images ordered by the integer after the last ``_`` (the benchmark's order).

    The prompt is the name before the last ``_`` (``prompt_split="last"``) or before the first,
    as T2I-CompBench's reader takes it (``"first"``)."""
    from PIL import Image

    if not folder.is_dir():
        raise UserError(f"images folder not found: {folder}")
    found: list[tuple[int, Sample]] = []
    for path in folder.iterdir():
        m = _NAME.match(path.name)
        if not m or not path.is_file():
            continue
        opener = (lambda p: lambda: Image.open(p))(path)
        underscore = "_" in m["prompt"]
        prompt = path.name.split("_")[0] if prompt_split == "first" else m["prompt"]
        found.append((int(m["idx"]), Sample(path.name, prompt, opener, category, underscore=underscore)))
    if not found:
        raise UserError(f"no images named PROMPT_IDX.png in {folder}")
    with_underscore = sum(s.underscore for _, s in found)
    if with_underscore:
        how = ("up to the first '_', as T2I-CompBench does" if prompt_split == "first" else
               "as everything before the last '_' (T2I-CompBench's own reader stops at the first: "
               "--prompt-split first)")
        print(f"note: {with_underscore} file names hold '_' in the prompt part; read {how}; marked in scores.jsonl",
              file=sys.stderr)
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
    prompt = _caption(tar_path, members, meta)
    ext = next((e for e in _IMAGE_EXTS if e in members), None)

    def opener() -> Any:
        if ext is None:
            raise OSError("no image member")
        return Image.open(io.BytesIO(_read_member(tar_path, members[ext])))

    name = f"{tar_path.name}:{key}.{ext or 'png'}"
    return Sample(name, prompt, opener, meta.get("category"), key, template=bool(meta.get("template")))


def _caption(tar_path: Path, members: dict[str, tarfile.TarInfo], meta: dict[str, Any]) -> str | None:
    """The sample's caption (``KEY.txt``); one that is not UTF-8 falls back to the metadata's prompt, else it
    is read with replacement characters (a sample's problem, never the run's)."""
    if "txt" not in members:
        return meta.get("prompt")
    data = _read_member(tar_path, members["txt"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        print(f"warning: {tar_path.name}:{members['txt'].name} is not UTF-8 text", file=sys.stderr)
        return meta.get("prompt") if isinstance(meta.get("prompt"), str) else data.decode("utf-8", "replace")


def shard_samples(run_dir: Path) -> list[Sample]:
    """Accepted samples of a run's complete shards (the rule every reader applies), in shard then key order."""
    from pipeline.io.completeness import read_run

    if not run_dir.is_dir():
        raise UserError(f"--shards {run_dir}: no such run folder")
    _, _, scan = read_run(str(run_dir), "score")
    tars = [run_dir / "shards" / f"{s:06d}.tar" for s in scan.shards]
    if not tars:
        raise UserError(f"no complete shards in run folder {run_dir}")
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


def as_scorer_set(scorer: Any, cfg: Any) -> Any:
    """A ScorerSet; a bare VqaScorer (older callers) becomes the set's BLIP-VQA scorer."""
    from pipeline.scoring.scorers import ScorerSet

    if isinstance(scorer, ScorerSet):
        return scorer
    scorers = ScorerSet(cfg)
    scorers.use("vqa", scorer)
    return scorers


def _score_one(sample: Sample, scorers: Any) -> tuple[Any, str | None]:
    """(Judgement, None) or (None, why the image is unreadable)."""
    if not sample.prompt:
        return None, "no prompt"
    try:
        with sample.open_image() as img:
            img.load()  # decode now: a broken file is the sample's problem, not the scorer's
            return scorers.judge(img, sample.prompt, sample.category), None
    except Exception as err:  # PIL raises many types for bad data (OSError, ValueError, SyntaxError...)
        return None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")


def _record(i: int, sample: Sample, name: str, result: Any, error: str | None, cfg: Any) -> dict:
    from pipeline.scoring.filter import decide

    rec: dict[str, Any] = {
        "index": i, "image": sample.name, "key": sample.key, "prompt": sample.prompt,
        "prompt_holds_underscore": sample.underscore, "category": sample.category, "template": sample.template,
        "scorer": name, "questions": result.questions if result else [],
    }
    if result is None:
        return {**rec, "answers": [], "parts": {}, "score": None, "status": "unreadable", "error": error,
                "threshold": None, "accepted": None}
    decision = decide(result.score, sample.category, cfg.filter, sample.template, result.scorable, name)
    return {**rec, "answers": result.answers, "parts": result.parts, "score": result.score, "status": "scored",
            "error": None, "note": result.note, "threshold": decision.threshold, "accepted": decision.accepted}


def score_samples(samples: list[Sample], scorer: Any, cfg: Any) -> Iterator[dict]:
    """One record per sample, in order, each judged by its category's scorer; unreadable ones get a
    status and a line on stderr."""
    from tqdm import tqdm

    scorers = as_scorer_set(scorer, cfg)
    with tqdm(total=len(samples), unit="img", desc="scoring", file=sys.stderr, dynamic_ncols=True) as bar:
        for i, sample in enumerate(samples):
            res, error = _score_one(sample, scorers)
            if res is None:
                bar.write(f"unreadable: {sample.name} ({error})", file=sys.stderr)
            yield _record(i, sample, scorers.scorer_name(sample.category), res, error, cfg)
            bar.update(1)


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


def answer(rec: dict, digits: int) -> Any:
    """The benchmark's answer: BLIP-VQA writes '{:.4f}' strings, CLIPScore, UniDet and 3-in-1 raw floats."""
    from pipeline.scoring.routing import BLIP_VQA
    from pipeline.scoring.scorers import benchmark_answer

    return benchmark_answer(rec.get("scorer", BLIP_VQA), rec["score"] or 0.0, digits)


def write_outputs(out: Path, records: list[dict], summary: dict, digits: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    vqa = [{"question_id": r["index"], "answer": answer(r, digits)} for r in records]
    write_atomic(out / "vqa_result.json", json.dumps(vqa))
    write_atomic(out / "scores.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    write_atomic(out / "score_summary.json", json.dumps(summary, indent=2) + "\n")


def by_scorer(records: list[dict]) -> dict[str, dict]:
    """Per scorer: images, scored, unreadable, mean (a mixed run's scores are on different scales)."""
    out: dict[str, dict] = {}
    for name in sorted({r["scorer"] for r in records}):
        mine = [r for r in records if r["scorer"] == name]
        scores = [r["score"] for r in mine if r["status"] == "scored"]
        out[name] = {"images": len(mine), "scored": len(scores), "unreadable": len(mine) - len(scores),
                     "mean_score": sum(scores) / len(scores) if scores else None}
    return out


def summarize(records: list[dict], scorers: Any, cfg: Any, source: str, prompt_split: str) -> dict:
    from pipeline.scoring.filter import selection_record

    scores = [r["score"] for r in records if r["status"] == "scored"]
    per = by_scorer(records)
    return {
        "source": source,
        "prompt_split": prompt_split,
        "prompts_holding_underscore": sum(r["prompt_holds_underscore"] for r in records),
        "images": len(records),
        "scored": len(scores),
        "unreadable": len(records) - len(scores),
        "mean_score": sum(scores) / len(scores) if scores else None,
        "by_scorer": per,
        # BLIP-VQA's full record (weights, spaCy, deviations) when it judged anything; every scorer's below
        "scorer": scorers.vqa.metadata if "vqa" in scorers.loaded() else {},
        "scorers": scorers.records(per),
        "selection": selection_record(cfg.filter),
        "config_hash": cfg.hash(),
    }


# --- entry point ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="score.py", description=__doc__.split("\n")[0])
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="T2I-CompBench samples folder ({prompt}_{idx:06d}.png)")
    src.add_argument("--shards", type=Path, metavar="RUN_DIR", help="run folder; scores RUN_DIR/shards/*.tar")
    parser.add_argument("--output", required=True, type=Path, help="folder for vqa_result.json and scores.jsonl")
    parser.add_argument("--category", default=None, help="category: its scorer and filter thresholds (--images only)")
    parser.add_argument("--prompt-split", choices=["last", "first"], default="last",
                        help="--images: prompt = name up to the last '_' (default) or the first (the benchmark's)")
    parser.add_argument("--config", type=Path, action="append",
                        help="YAML preset (default: paper settings); repeat to layer presets (later ones win key by "
                             "key), as synthesize.py does")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    return parser


def check_output(out: Path) -> None:
    """Before any scoring: the output must be a folder this process can write."""
    if not str(out).strip():
        raise UserError("--output is empty; give a folder path")
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; give a folder")
    parent = existing_parent(out)
    # Nothing is created yet: a bad input found next must leave no output folder behind.
    target = out if out.exists() else parent
    if target is not None and not os.access(target, os.W_OK | os.X_OK):
        raise UserError(f"--output {out}: cannot write there ({target} is not writable)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_output(args.output)
    from pipeline.config_loading import load_config
    from pipeline.models.lora_files import resolve_lora
    from pipeline.scoring.scorer_record import check_vqa_source, describe

    cfg = resolve_lora(load_config(args.config, args.overrides))
    check_vqa_source(cfg)
    if args.images is not None:
        samples, source = folder_samples(args.images, args.category, args.prompt_split), str(args.images)
    else:
        samples, source = shard_samples(args.shards), str(args.shards)

    from pipeline.scoring.routing import BLIP_VQA, scorers_for
    from pipeline.scoring.scorers import ScorerSet

    scorers = ScorerSet(cfg)
    scorers.prepare(scorers_for({s.category for s in samples}, cfg.scoring))  # only the models needed
    records = list(score_samples(samples, scorers, cfg))
    summary = summarize(records, scorers, cfg, source, args.prompt_split)
    try:
        write_outputs(args.output, records, summary, cfg.vqa.round_digits)
    except OSError as err:  # a full or read-only disk: one line, nothing half-written (atomic renames)
        raise UserError(f"--output {args.output}: cannot write the scores ({err.strerror or err})") from None
    for name, part in summary["by_scorer"].items():
        mean = part["mean_score"]
        shown = f"{mean:.{cfg.vqa.round_digits}f}" if mean is not None else "n/a"
        print(f"{SCORE_NAMES[name]} score: {shown} ({part['scored']} images scored, {part['unreadable']} unreadable)")
        record = summary["scorers"][name]
        devs = f"; deviations: {'; '.join(record['deviations'])}" if record["deviations"] else ""
        print(describe(scorers.vqa.record) if name == BLIP_VQA else record["label"] + devs)
    return 0


if __name__ == "__main__":
    run_main(main)
