"""The run folder: ``run.json`` (what a resume must match), leftovers of crashes, ``summary.json``."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.accounting import run_accounting
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.shards import SHARDS_DIR, read_stats
from schemas.run import COUNT_FIELDS, RunInfo, ShardStats, Summary


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def code_version() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def make_run_info(
    cfg: Config, model_ids: dict[str, str], fingerprint: dict[str, Any], prompts_uri: str, num_shards: int,
    scorer: dict[str, Any] | None = None,
) -> RunInfo:
    t = now()
    return RunInfo(
        config=cfg.to_dict(), config_hash=cfg.hash(), model_ids=model_ids, input=fingerprint,
        prompts_uri=prompts_uri, shard_size=cfg.job.shard_size, num_shards=num_shards,
        code_version=code_version(), created_at=t, updated_at=t, scorer=dict(scorer or {}),
    )


def _mismatch(old: dict[str, Any], new: RunInfo) -> str | None:
    if old.get("config_hash") != new.config_hash:
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
    selector = pafs.FileSelector(storage.join(out, SHARDS_DIR), allow_not_found=True)
    removed = 0
    for info in fs.get_file_info(selector):
        if ".tmp-" in info.path.rsplit("/", 1)[-1]:
            fs.delete_file(info.path)
            removed += 1
    return removed


def summarize(
    fs: pafs.FileSystem, out: str, num_shards: int, failed: list[int], wall: float, retries: int, skipped: int,
    scorer: dict[str, Any] | None = None, cfg: Config | None = None,
) -> Summary:
    """Totals from the complete shards' markers; with ``cfg``, its target and device-hour price."""
    stats: list[ShardStats] = [s for s in (read_stats(fs, out, i) for i in range(num_shards)) if s is not None]
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
