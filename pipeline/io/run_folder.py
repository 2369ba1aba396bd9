"""The run folder: ``run.json`` (what a resume must match), leftovers of crashes, ``summary.json``."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs
import yaml

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.io import storage
from pipeline.io.completeness import run_config_hash, scan_shards
from pipeline.io.placement import PLACEMENT_FILE
from pipeline.io.retired import FILTERED_DIR, ListedShard
from pipeline.io.shards import REJECTED_DIR, SHARDS_DIR
from pipeline.versions import OUTPUT_LIBRARIES, code_version, library_versions
from schemas.run import COUNT_FIELDS, RunInfo, ShardStats, Summary
from schemas.samples import card_features


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def make_run_info(
    cfg: Config, model_ids: dict[str, str], fingerprint: dict[str, Any], prompts_uri: str, num_shards: int,
    scorer: dict[str, Any] | None = None,
) -> RunInfo:
    t = now()
    return RunInfo(
        config=cfg.to_dict(), config_hash=cfg.hash(), model_ids=model_ids, input=fingerprint,
        prompts_uri=prompts_uri, shard_size=cfg.job.shard_size, num_shards=num_shards,
        code_version=code_version(), created_at=t, updated_at=t, scorer=dict(scorer or {}),
        libraries=library_versions(cfg.vqa.spacy_model),
    )


def _library_change(old: dict[str, Any], new: RunInfo) -> str | None:
    """'torch 2.13.0 -> 2.14.0, ...' for the output-changing libraries that differ, if run.json has them."""
    before = old.get("libraries") or {}
    keys = [*OUTPUT_LIBRARIES, "spacy_model"]
    now = new.libraries
    changed = [f"{k} {before[k]} -> {now.get(k)}" for k in keys if k in before and before[k] != now.get(k)]
    return ", ".join(changed) or None


def _mismatch(old: dict[str, Any], new: RunInfo, with_input: bool = True) -> str | None:
    if old.get("config_hash") != new.config_hash:
        change = _library_change(old, new)
        if change:
            return f"the library versions differ ({change}), which can change images and scores"
        return "the configuration differs"
    if old.get("shard_size") != new.shard_size:
        return "the shard size differs"
    if not with_input:  # a growing input is the placement's business (pipeline/io/nightly.py)
        return None
    old_input = old.get("input") or {}
    if "content_sha256" not in old_input:
        return "the input fingerprint is from an older version (no content hash), so a resume cannot be checked"
    if old_input.get("content_sha256") != new.input.get("content_sha256"):
        return "the input prompts differ (their content)"
    return None


def check_run(fs: pafs.FileSystem, out: str, info: RunInfo, force: bool, output_uri: str,
              with_input: bool = False) -> dict[str, Any] | None:
    """The earlier run.json when this folder continues a run with the same configuration (resume or
    append; with ``with_input``, the same input too), None for a new run; a different one is refused
    unless ``force`` (which clears the earlier run). Writes nothing else."""
    path = storage.join(out, "run.json")
    fs.create_dir(storage.join(out, SHARDS_DIR), recursive=True)
    if not storage.exists(fs, path):
        return None
    try:
        old = json.loads(storage.read_bytes(fs, path))
    except ValueError:
        old = {}
    problem = _mismatch(old, info, with_input=with_input)
    if problem and not force:
        raise UserError(
            f"output {output_uri} holds a run whose {problem.split(' ', 1)[1]}; "
            "use a new --output, or --force to redo every shard with the new settings"
        )
    if problem:
        _clear_old_run(fs, out)
        return None
    return old


def write_run_info(fs: pafs.FileSystem, out: str, info: RunInfo) -> None:
    storage.write_atomic(fs, storage.join(out, "run.json"), json.dumps(info.to_dict(), indent=1, default=str).encode())


def prepare_run(fs: pafs.FileSystem, out: str, info: RunInfo, force: bool, output_uri: str) -> bool:
    """Write or check ``run.json`` for a fixed input (no placement). Returns True when this resumes an earlier run."""
    old = check_run(fs, out, info, force, output_uri, with_input=True)
    if old is not None:
        info.created_at = old.get("created_at", info.created_at)
    write_run_info(fs, out, info)
    return old is not None


# Outputs of a whole run that readers find by name; --force removes them with the old shards.
_RUN_OUTPUTS = ("summary.json", "shards.txt", PLACEMENT_FILE)
_SHARD_FOLDERS = (SHARDS_DIR, "rejected", FILTERED_DIR)


def _clear_old_run(fs: pafs.FileSystem, out: str) -> None:
    """--force: remove every file of the old run where readers look (its plan may differ, so a
    shard the new plan lacks would stay readable). Markers first, so a crash midway cannot leave
    a stale 'done' shard."""
    files = []
    for folder in _SHARD_FOLDERS:
        selector = pafs.FileSelector(storage.join(out, folder), allow_not_found=True, recursive=True)
        files += [i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File]
    files += [p for p in (storage.join(out, n) for n in _RUN_OUTPUTS) if storage.exists(fs, p)]
    files.sort(key=lambda p: not p.endswith(".stats.json"))
    for path in files:
        fs.delete_file(path)
    if files:
        print(f"--force: removed {len(files)} files of the earlier run in {out}", file=sys.stderr)


def remove_leftovers(fs: pafs.FileSystem, out: str) -> int:
    """Delete temporary files a crashed writer left behind (never a final name)."""
    removed = 0
    for folder in (SHARDS_DIR, REJECTED_DIR):
        selector = pafs.FileSelector(storage.join(out, folder), allow_not_found=True)
        for info in fs.get_file_info(selector):
            if ".tmp-" in info.path.rsplit("/", 1)[-1]:
                fs.delete_file(info.path)
                removed += 1
    return removed


def complete_stats(fs: pafs.FileSystem, out: str, shards: list[int], config_hash: str) -> list[ShardStats]:
    """The markers of those of ``shards`` that are complete (``pipeline.io.completeness``), in shard order."""
    return scan_shards(fs, out, config_hash, shards).complete


def summarize(
    fs: pafs.FileSystem, out: str, num_shards: int, failed: list[int], wall: float, retries: int, skipped: int,
    scorer: dict[str, Any] | None = None, accounting: dict[str, Any] | None = None,
    stats: list[ShardStats] | None = None, listed: list[ListedShard] | None = None, retired_prompts: int = 0,
) -> Summary:
    """Totals from the complete shards' markers (every night's); ``accounting``: the cost fields the caller
    worked out from the same markers (``pipeline.budget.accounting.run_accounting``); with ``listed`` (the
    dataset's tars after retirements), the accepted samples retired prompts hold."""
    if stats is None:
        stats = scan_shards(fs, out, run_config_hash(fs, out, out), list(range(num_shards))).complete
    done = {s.shard for s in stats}
    total = {k: sum(getattr(s, k) for s in stats) for k in COUNT_FIELDS}
    generated = total["accepted"] + total["rejected"] + total["failed"]
    return Summary(
        shards_total=num_shards, shards_completed=len(done), shards_failed=sorted(failed),
        wall_seconds=round(wall, 3), images_per_hour=round(3600 * generated / wall, 1) if wall > 0 else 0.0,
        finished_at=now(), retries=retries, skipped_shards=skipped, scorer=dict(scorer or {}), **total,
        **(accounting or {}), nights=per_night(stats), retired_prompts=retired_prompts,
        retired_accepted=total["accepted"] - sum(x.accepted for x in listed) if listed is not None else 0,
    )


def per_night(stats: list[ShardStats]) -> dict[str, dict[str, int]]:
    """Sample counts of the complete shards by the night that made them (keys "1", "2", ...)."""
    out: dict[str, dict[str, int]] = {}
    for s in stats:
        acc = out.setdefault(str(s.night), {"shards": 0, **{k: 0 for k in COUNT_FIELDS}})
        acc["shards"] += 1
        for k in COUNT_FIELDS:
            acc[k] += getattr(s, k)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def write_summary(fs: pafs.FileSystem, out: str, summary: Summary) -> None:
    storage.write_atomic(fs, storage.join(out, "summary.json"), json.dumps(summary.to_dict(), indent=1).encode())


INDEX_FILE = "shards.txt"
CARD_FILE = "README.md"


def _url(output_uri: str, out: str, rel: str) -> str:
    """A file of the run as a user names it: an absolute path, or the output's scheme://..."""
    base = out if "://" not in output_uri else f"{output_uri.split('://', 1)[0]}://{out}"
    return storage.join(base, rel)


def _tar_url(output_uri: str, out: str, shard: int) -> str:
    return _url(output_uri, out, f"{SHARDS_DIR}/{shard:06d}.tar")


_BRACE_CHARS = "{},"  # braceexpand's syntax: a folder holding any of them cannot be named by a pattern


def brace_pattern(output_uri: str, out: str, shards: list[int]) -> str | None:
    """``.../shards/{000000..000041}.tar`` when the shards are contiguous (webdataset expands it). None when
    the folder's own name holds brace-expansion characters: webdataset would expand those too."""
    if len(shards) < 2 or shards != list(range(shards[0], shards[-1] + 1)):
        return None
    if any(c in _tar_url(output_uri, out, 0) for c in _BRACE_CHARS):
        return None
    return _tar_url(output_uri, out, 0).replace("000000.tar", f"{{{shards[0]:06d}..{shards[-1]:06d}}}.tar")


def write_index(fs: pafs.FileSystem, out: str, output_uri: str, listed: list[ListedShard]) -> None:
    """``shards.txt``: one listed shard's tar URL a line (every complete shard of every night, a filtered copy
    where prompts were retired); a first ``#`` line holds the brace pattern when they are contiguous whole
    shards (skip lines starting with ``#`` when reading the URLs)."""
    lines = [_url(output_uri, out, x.path) for x in listed]
    whole = all(x.path.startswith(f"{SHARDS_DIR}/") for x in listed)
    pattern = brace_pattern(output_uri, out, [x.stats.shard for x in listed]) if whole else None
    if pattern:
        lines.insert(0, f"# {pattern}")
    storage.write_atomic(fs, storage.join(out, INDEX_FILE), ("\n".join(lines) + "\n" if lines else "").encode())


def write_card(fs: pafs.FileSystem, out: str, info: RunInfo, summary: Summary, listed: list[ListedShard]) -> None:
    """``README.md``, a dataset card: its ``configs`` list the listed tars that hold accepted samples, so
    ``datasets.load_dataset(RUN_DIR)`` and the Hub read exactly those (every night's, none of a retired prompt);
    its ``dataset_info.features`` declare the columns' types (schemas/samples.py), so a reader never infers them
    from the first shard's samples (a field null there and a number later, or a scorer's own keys)."""
    files = [x.path for x in listed if x.accepted > 0]
    accepted = sum(x.accepted for x in listed)
    card = {
        "pretty_name": "referee-synth run",
        "task_categories": ["text-to-image"],
        "tags": ["webdataset", "synthetic", "referee-synth"],
        "size_categories": [_size_category(accepted)],
    }
    if files:
        card["configs"] = [{"config_name": "default", "data_files": [{"split": "train", "path": files}]}]
        image_format = info.config.get("job", {}).get("image_format", "png")
        card["dataset_info"] = {"config_name": "default", "features": card_features(image_format)}
    front = yaml.safe_dump(card, sort_keys=False).rstrip()
    libs = ", ".join(f"{k} {v}" for k, v in info.libraries.items())
    nights = len(info.history) or 1
    retired = (f"\n- Retired (`--drop-removed`): {summary.retired_prompts} prompts, {summary.retired_accepted} "
               "accepted samples left out of this card and `shards.txt` (their files stay; `placement.parquet` "
               "marks them)." if summary.retired_prompts else "")
    body = f"""# referee-synth run

Synthetic (image, caption, score) pairs: images made by inverting a BLIP-2 referee with SDS
(Stable Diffusion 1.5), each scored by BLIP-VQA (T2I-CompBench protocol) and kept when its score
passes the category threshold.

- Accepted samples: {accepted} in {len(files)} complete shards (WebDataset:
  `KEY.png|jpg|webp` image, `KEY.txt` caption, `KEY.json` metadata with `vqa_score` and `night`), made over
  {nights} night(s) into this folder (history in `run.json`, totals per night in `summary.json`).{retired}
- Every sample, accepted or not: `shards/*.parquet`; rejected images (if kept): `rejected/*.tar`.
- Shard list: `shards.txt`. Totals: `summary.json`. Configuration and versions: `run.json`.
- Config hash `{info.config_hash}`, code version `{info.code_version}`.
- Libraries: {libs}.
{_generator_table(summary.generators)}
```python
import datasets
ds = datasets.load_dataset("RUN_DIR", split="train")   # columns png/jpg/webp, txt, json
```
"""
    storage.write_atomic(fs, storage.join(out, CARD_FILE), f"---\n{front}\n---\n{body}".encode())


def generator_rows(generators: dict[str, Any]) -> list[tuple[str, str, int, float | None, float | None]]:
    """(generator, category, accepted, seconds per accepted image, share of the category's accepted images) of
    summary.json's ``generators``, overall rows first (category "all", share of every accepted image)."""
    rows = []
    for gen, g in generators.items():
        rows.append((gen, "all", g["accepted"], g["seconds_per_accepted"], g["share"]))
        rows += [(gen, name, c["accepted"], c["seconds_per_accepted"], c["share"])
                 for name, c in g.get("categories", {}).items()]
    return rows


def _generator_table(generators: dict[str, Any]) -> str:
    """The card's split by generator (a cascade's stages; one row per category), or nothing."""
    if not generators:
        return ""
    lines = ["", "Made by (complete shards; share: of the category's accepted images):", "",
             "| generator | category | accepted | seconds per accepted | share |", "|---|---|---|---|---|"]
    for gen, cat, acc, spa, share in generator_rows(generators):
        lines.append(f"| {gen} | {cat} | {acc} | {'-' if spa is None else f'{spa:.2f}'} | "
                     f"{'-' if share is None else f'{share:.1%}'} |")
    return "\n".join(lines) + "\n"


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"
