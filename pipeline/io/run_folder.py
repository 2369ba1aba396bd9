"""The run folder: ``run.json`` (what a resume must match), leftovers of crashes, ``summary.json``."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import Any

import pyarrow.fs as pafs
import yaml

from pipeline.budget.accounting import run_accounting
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.io import storage
from pipeline.io.shards import REJECTED_DIR, SHARDS_DIR, read_stats
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


def _mismatch(old: dict[str, Any], new: RunInfo) -> str | None:
    if old.get("config_hash") != new.config_hash:
        change = _library_change(old, new)
        if change:
            return f"the library versions differ ({change}), which can change images and scores"
        return "the configuration differs"
    old_input = old.get("input") or {}
    if "content_sha256" not in old_input:
        return "the input fingerprint is from an older version (no content hash), so a resume cannot be checked"
    if old_input.get("content_sha256") != new.input.get("content_sha256"):
        return "the input prompts differ (their content)"
    if old.get("shard_size") != new.shard_size:
        return "the shard size differs"
    return None


def prepare_run(fs: pafs.FileSystem, out: str, info: RunInfo, force: bool, output_uri: str) -> bool:
    """Write or check ``run.json``. Returns True when this resumes an earlier run."""
    path = storage.join(out, "run.json")
    fs.create_dir(storage.join(out, SHARDS_DIR), recursive=True)
    resumed = False
    if storage.exists(fs, path):
        try:
            old = json.loads(storage.read_bytes(fs, path))
        except ValueError:
            old = {}
        problem = _mismatch(old, info)
        if problem and not force:
            raise UserError(
                f"output {output_uri} holds a run whose {problem.split(' ', 1)[1]}; "
                "use a new --output, or --force to redo every shard with the new settings"
            )
        if problem:
            _clear_old_run(fs, out)
        else:
            info.created_at = old.get("created_at", info.created_at)
            resumed = True
    storage.write_atomic(fs, path, json.dumps(info.to_dict(), indent=1, default=str).encode())
    return resumed


# Outputs of a whole run that readers find by name; --force removes them with the old shards.
_RUN_OUTPUTS = ("summary.json", "shards.txt")
_SHARD_FOLDERS = (SHARDS_DIR, "rejected")


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


def complete_stats(fs: pafs.FileSystem, out: str, num_shards: int, config_hash: str | None = None) -> list[ShardStats]:
    """The markers of the run's shards (made with ``config_hash`` when given), in shard order."""
    stats = (read_stats(fs, out, i) for i in range(num_shards))
    return [s for s in stats if s is not None and (config_hash is None or s.config_hash == config_hash)]


def summarize(
    fs: pafs.FileSystem, out: str, num_shards: int, failed: list[int], wall: float, retries: int, skipped: int,
    scorer: dict[str, Any] | None = None, cfg: Config | None = None, stats: list[ShardStats] | None = None,
) -> Summary:
    """Totals from the complete shards' markers; with ``cfg``, its target and device-hour price."""
    stats = complete_stats(fs, out, num_shards) if stats is None else stats
    done = {s.shard for s in stats}
    total = {k: sum(getattr(s, k) for s in stats) for k in COUNT_FIELDS}
    generated = total["accepted"] + total["rejected"] + total["failed"]
    return Summary(
        shards_total=num_shards, shards_completed=len(done), shards_failed=sorted(failed),
        wall_seconds=round(wall, 3), images_per_hour=round(3600 * generated / wall, 1) if wall > 0 else 0.0,
        finished_at=now(), retries=retries, skipped_shards=skipped, scorer=dict(scorer or {}), **total,
        **_accounting(stats, cfg),
    )


def _accounting(stats: list[ShardStats], cfg: Config | None) -> dict[str, Any]:
    price = cfg.cost.gpu_hour_price if cfg else 0.0
    target, most = (cfg.job.target_accepted, cfg.job.max_samples_per_prompt) if cfg else (0, 0)
    return run_accounting(stats, price, target, most)


def write_summary(fs: pafs.FileSystem, out: str, summary: Summary) -> None:
    storage.write_atomic(fs, storage.join(out, "summary.json"), json.dumps(summary.to_dict(), indent=1).encode())


INDEX_FILE = "shards.txt"
CARD_FILE = "README.md"


def _tar_url(output_uri: str, out: str, shard: int) -> str:
    """A complete shard's tar as a user names it: an absolute path, or the output's scheme://..."""
    base = out if "://" not in output_uri else f"{output_uri.split('://', 1)[0]}://{out}"
    return storage.join(base, SHARDS_DIR, f"{shard:06d}.tar")


def brace_pattern(output_uri: str, out: str, shards: list[int]) -> str | None:
    """``.../shards/{000000..000041}.tar`` when the shards are contiguous (webdataset expands it)."""
    if len(shards) < 2 or shards != list(range(shards[0], shards[-1] + 1)):
        return None
    return _tar_url(output_uri, out, 0).replace("000000.tar", f"{{{shards[0]:06d}..{shards[-1]:06d}}}.tar")


def write_index(fs: pafs.FileSystem, out: str, output_uri: str, stats: list[ShardStats]) -> None:
    """``shards.txt``: one complete shard's tar URL a line; a first ``#`` line holds the brace pattern
    when the shards are contiguous (skip lines starting with ``#`` when reading the URLs)."""
    shards = [s.shard for s in stats]
    lines = [_tar_url(output_uri, out, s) for s in shards]
    pattern = brace_pattern(output_uri, out, shards)
    if pattern:
        lines.insert(0, f"# {pattern}")
    storage.write_atomic(fs, storage.join(out, INDEX_FILE), ("\n".join(lines) + "\n" if lines else "").encode())


def write_card(fs: pafs.FileSystem, out: str, info: RunInfo, summary: Summary, stats: list[ShardStats]) -> None:
    """``README.md``, a dataset card: its ``configs`` list the accepted tars of complete shards (the ones
    with accepted samples), so ``datasets.load_dataset(RUN_DIR)`` and the Hub read exactly those; its
    ``dataset_info.features`` declare the columns' types (schemas/samples.py), so a reader never infers them
    from the first shard's samples (a field null there and a number later, or a scorer's own keys)."""
    files = [f"{SHARDS_DIR}/{s.shard:06d}.tar" for s in stats if s.accepted > 0]
    card = {
        "pretty_name": "referee-synth run",
        "task_categories": ["text-to-image"],
        "tags": ["webdataset", "synthetic", "referee-synth"],
        "size_categories": [_size_category(summary.accepted)],
    }
    if files:
        card["configs"] = [{"config_name": "default", "data_files": [{"split": "train", "path": files}]}]
        image_format = info.config.get("job", {}).get("image_format", "png")
        card["dataset_info"] = {"config_name": "default", "features": card_features(image_format)}
    front = yaml.safe_dump(card, sort_keys=False).rstrip()
    libs = ", ".join(f"{k} {v}" for k, v in info.libraries.items())
    body = f"""# referee-synth run

Synthetic (image, caption, score) pairs: images made by inverting a BLIP-2 referee with SDS
(Stable Diffusion 1.5), each scored by BLIP-VQA (T2I-CompBench protocol) and kept when its score
passes the category threshold.

- Accepted samples: {summary.accepted} in {len(files)} complete shards (`shards/*.tar`, WebDataset:
  `KEY.png|jpg|webp` image, `KEY.txt` caption, `KEY.json` metadata with `vqa_score`).
- Every sample, accepted or not: `shards/*.parquet`; rejected images (if kept): `rejected/*.tar`.
- Shard list: `shards.txt`. Totals: `summary.json`. Configuration and versions: `run.json`.
- Config hash `{info.config_hash}`, code version `{info.code_version}`.
- Libraries: {libs}.

```python
import datasets
ds = datasets.load_dataset("RUN_DIR", split="train")   # columns png/jpg/webp, txt, json
```
"""
    storage.write_atomic(fs, storage.join(out, CARD_FILE), f"---\n{front}\n---\n{body}".encode())


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"
