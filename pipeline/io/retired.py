"""What the dataset lists once prompts are retired (``--drop-removed``): shards.txt, the card, the readers.

A shard's files are never rewritten for a retirement. A shard whose every prompt is retired leaves the
listings. A shard that mixes retired and live prompts is listed through a filtered copy of its tar,
``filtered/{shard:06d}-{tag}.tar``: the live prompts' accepted samples, same keys, same member bytes.
The tag is a digest of the retired slots and the marker that vouches for the tar, so a later retirement or
a redo of the shard gives a new copy (earlier copies stay, unlisted). ``shards/*.tar`` keeps every
sample; a reader that wants the dataset reads ``shards.txt`` or the card, not a glob.
"""

from __future__ import annotations

import hashlib
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.io import storage
from pipeline.io.placement import Placement
from pipeline.io.shards import SHARDS_DIR, shard_paths
from schemas.run import ShardStats
from schemas.samples import ROW_DIGITS, SHARD_DIGITS

FILTERED_DIR = "filtered"


@dataclass
class ListedShard:
    stats: ShardStats
    path: str  # the tar, relative to the run folder
    accepted: int  # accepted samples in that tar


def slot_of(key: str) -> int:
    return int(key[SHARD_DIGITS:SHARD_DIGITS + ROW_DIGITS])


def _tag(slots: set[int], stats: ShardStats) -> str:
    text = f"{sorted(slots)}|{stats.tar_bytes}|{stats.finished_at}|{stats.config_hash}"
    return hashlib.blake2b(text.encode(), digest_size=4).hexdigest()


def _filter_tar(fs: pafs.FileSystem, src: str, dst: str, slots: set[int]) -> int:
    """Copy ``src`` without the members of ``slots``; returns the accepted samples kept."""
    keys = set()
    with tempfile.TemporaryDirectory(prefix="filtered-") as tmp:
        local = Path(tmp) / "shard.tar"
        with fs.open_input_file(src) as handle, tarfile.open(fileobj=handle, mode="r:") as tin, \
                tarfile.open(local, "w", format=tarfile.PAX_FORMAT) as tout:
            for member in tin:
                key = member.name.split(".", 1)[0]
                if slot_of(key) in slots:
                    continue
                keys.add(key)
                tout.addfile(member, tin.extractfile(member))
        storage.upload_file_atomic(fs, str(local), dst)
    return len(keys)


def _count_keys(fs: pafs.FileSystem, path: str) -> int:
    with fs.open_input_file(path) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
        return len({m.name.split(".", 1)[0] for m in tar})


def dataset_shards(fs: pafs.FileSystem, out: str, stats: list[ShardStats], placement: Placement | None,
                   build: bool = True) -> list[ListedShard]:
    """The complete shards as the dataset lists them; ``build``: write missing filtered copies (the driver,
    under the lease); readers pass False and fall back to the whole tar if a copy is missing."""
    retired = placement.retired_slots() if placement is not None else {}
    listed = []
    for s in stats:
        slots = retired.get(s.shard)
        whole = f"{SHARDS_DIR}/{s.shard:06d}.tar"
        if not slots:
            listed.append(ListedShard(s, whole, s.accepted))
            continue
        if len(slots) >= placement.slots_of(s.shard):
            continue  # every prompt of the shard is retired
        rel = f"{FILTERED_DIR}/{s.shard:06d}-{_tag(slots, s)}.tar"
        path = storage.join(out, rel)
        if storage.exists(fs, path):
            listed.append(ListedShard(s, rel, _count_keys(fs, path)))
        elif build:
            listed.append(ListedShard(s, rel, _filter_tar(fs, shard_paths(out, s.shard)["tar"], path, slots)))
        else:
            listed.append(ListedShard(s, whole, s.accepted))
    return listed


def retired_filter(placement: Placement | None):
    """A predicate on sidecar records: True for a sample of a live prompt."""
    retired = placement.retired_slots() if placement is not None else {}
    if not retired:
        return lambda rec: True
    return lambda rec: slot_of(rec["key"]) not in retired.get(rec["shard"], ())
