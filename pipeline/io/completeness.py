"""The one rule for "this shard is complete", used by every reader of a run folder and by the resume.

A shard counts only when all of these hold: its stats marker parses and names this shard; it was made
with the run's configuration (``run.json``'s ``config_hash``, or the hash a resuming driver computes);
the tar, the sidecar and the rejected-images tar have the sizes the marker vouches for; and the sidecar
holds this shard's samples, as many as the marker counts (a sidecar copied from another shard has
another shard's keys). Shards are found by their markers, so the rule assumes no numbering: shard ids
may have gaps and the set may grow between runs (a rerun on appended prompts).

Readers skip what fails the rule and say so once (``ShardScan.warn``); the resume redoes it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline.io import storage
from pipeline.io.shards import SHARDS_DIR, read_stats, shard_paths
from schemas.run import ShardStats
from schemas.samples import SHARD_DIGITS, key_shard

_MARKER_SUFFIX = ".stats.json"


@dataclass
class ShardScan:
    """Complete shards' markers in shard order, and why each other marked shard does not count."""

    complete: list[ShardStats] = field(default_factory=list)
    incomplete: dict[int, str] = field(default_factory=dict)

    @property
    def shards(self) -> list[int]:
        return [s.shard for s in self.complete]

    def warn(self, who: str) -> None:
        """One line per skipped shard (at most 10, then a count) on stderr."""
        items = sorted(self.incomplete.items())
        for shard, why in items[:10]:
            print(f"warning: {who}: shard {shard:0{SHARD_DIGITS}d} is left out: {why}", file=sys.stderr)
        if len(items) > 10:
            print(f"warning: {who}: {len(items) - 10} more shards left out", file=sys.stderr)


def run_config_hash(fs: pafs.FileSystem, out: str, uri: str) -> str:
    """``run.json``'s config hash; a missing or damaged run.json is one line (exit 2)."""
    path = storage.join(out, "run.json")
    if not storage.exists(fs, path):
        raise UserError(f"{uri} is not a run folder (no run.json)")
    try:
        data = json.loads(storage.read_bytes(fs, path))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise UserError(f"{uri}/run.json is not readable JSON (damaged?); its shards cannot be checked") from None
    except OSError as err:
        raise UserError(f"{uri}/run.json cannot be read ({str(err).splitlines()[0]})") from None
    value = data.get("config_hash") if isinstance(data, dict) else None
    if not isinstance(value, str) or not value:
        raise UserError(f"{uri}/run.json has no config_hash (damaged?); its shards cannot be checked")
    return value


def marked_shards(fs: pafs.FileSystem, out: str) -> list[int]:
    """Shard ids that have a marker file, in order (whatever their numbering)."""
    selector = pafs.FileSelector(storage.join(out, SHARDS_DIR), allow_not_found=True)
    found = []
    for info in fs.get_file_info(selector):
        name = info.path.rsplit("/", 1)[-1]
        stem = name[: -len(_MARKER_SUFFIX)] if name.endswith(_MARKER_SUFFIX) else ""
        if len(stem) == SHARD_DIGITS and stem.isascii() and stem.isdigit():
            found.append(int(stem))
    return sorted(found)


def _sizes_problem(fs: pafs.FileSystem, out: str, stats: ShardStats) -> str | None:
    paths = shard_paths(out, stats.shard)
    wanted = [("tar", stats.tar_bytes), ("parquet", stats.parquet_bytes)]
    if stats.rejected_tar_bytes:
        wanted.append(("rejected", stats.rejected_tar_bytes))
    for name, size in wanted:
        have = storage.file_size(fs, paths[name])
        if have != size:
            what = "is missing" if have is None else f"has {have} bytes, its marker says {size}"
            return f"{paths[name].rsplit('/', 1)[-1]} {what}"
    return None


def _sidecar_problem(fs: pafs.FileSystem, out: str, stats: ShardStats) -> str | None:
    path = shard_paths(out, stats.shard)["parquet"]
    try:
        with fs.open_input_file(path) as handle:
            table = pq.read_table(handle, columns=["key", "shard"])
    except (OSError, pa.ArrowException) as err:
        return f"its sidecar cannot be read ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    if table.num_rows != stats.samples:
        return f"its sidecar holds {table.num_rows} samples, its marker says {stats.samples}"
    keys, shards = table.column("key").to_pylist(), table.column("shard").to_pylist()
    if any(key_shard(k) != stats.shard or s != stats.shard for k, s in zip(keys, shards)):
        return "its sidecar holds another shard's samples"
    return None


def shard_problem(fs: pafs.FileSystem, out: str, shard: int, config_hash: str) -> str | None:
    """Why ``shard`` is not complete, or None when it is."""
    try:
        stats = read_stats(fs, out, shard)
    except OSError as err:
        return f"its marker cannot be read ({str(err).splitlines()[0]})"
    if stats is None:
        return "no readable stats marker"
    if stats.shard != shard:
        return f"its marker is shard {stats.shard}'s"
    if stats.config_hash != config_hash:
        return f"made with another configuration (config hash {stats.config_hash}, the run's is {config_hash})"
    return _sizes_problem(fs, out, stats) or _sidecar_problem(fs, out, stats)


def complete_stats_of(fs: pafs.FileSystem, out: str, shard: int, config_hash: str) -> ShardStats | None:
    """The shard's marker when the shard is complete, else None."""
    return read_stats(fs, out, shard) if shard_problem(fs, out, shard, config_hash) is None else None


def scan_shards(fs: pafs.FileSystem, out: str, config_hash: str, shards: list[int] | None = None) -> ShardScan:
    """Apply the rule to ``shards`` (default: every shard with a marker)."""
    scan = ShardScan()
    for shard in sorted(set(marked_shards(fs, out) if shards is None else shards)):
        problem = shard_problem(fs, out, shard, config_hash)
        stats = read_stats(fs, out, shard) if problem is None else None
        if stats is not None:
            scan.complete.append(stats)
        elif shards is None or problem != "no readable stats marker":
            scan.incomplete[shard] = problem or "its marker vanished"
    return scan


def read_run(run: str, who: str) -> tuple[pafs.FileSystem, str, ShardScan]:
    """A reader's view of a run folder: (file system, path, the complete shards); skipped ones are warned."""
    fs, out = storage.filesystem_for(run)
    scan = scan_shards(fs, out, run_config_hash(fs, out, run))
    scan.warn(who)
    return fs, out, scan
