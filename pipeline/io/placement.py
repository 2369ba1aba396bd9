"""Stable placement: which shard and slot each prompt_id has, recorded in the run folder.

A prompt keeps the (shard, slot) it was first placed at for the life of the run folder; its sample
keys are ``{shard}{slot}{sample}``, so they depend on the prompt and its sample index, never on how
many rows come before it in tonight's table. Prompts not yet placed go, in input order, into new
shards numbered after the last one; an existing shard is never re-planned (a partly filled last shard
stays as it is). On the first night this is exactly the positional plan (shard i = rows [i*S, (i+1)*S)).

The plan is one Parquet file, ``OUT/placement.parquet``: one row per placed prompt (id, shard, slot,
content digest, the night that placed it, the night that last redid it, the night that retired it),
written atomically before any shard of a night runs, so a resume, an append and every reader use the
same one. Columns, not objects: a million placed prompts cost seconds and a few hundred MB to diff.

Plan key: the ``prompt_id``; a row whose id repeats an earlier row's (an ``invalid_input`` row) is
placed under ``{prompt_id}\\x1f{n}`` (its n-th repeat), so it has its own slot too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline.io import storage
from schemas.prompts import PromptRow
from schemas.samples import MAX_SHARD_SIZE, SHARD_DIGITS

PLACEMENT_FILE = "placement.parquet"
PLACEMENT_VERSION = 1
_REPEAT = "\x1f"
_NONE = "\x00"

PLACEMENT_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),  # the plan key (see the module doc)
    ("shard", pa.int32()),
    ("slot", pa.int32()),  # the prompt's place in its shard: the key's five middle digits
    ("digest", pa.int64()),  # of text, category, seed, num_samples, template: an edit changes it
    ("night", pa.int32()),  # the invocation that placed it (1, 2, ...)
    ("redone", pa.int32()),  # the invocation that last redid it after an edit (0: never)
    ("retired", pa.int32()),  # the invocation that retired it (--drop-removed; 0: live)
])


def row_digest(row: PromptRow) -> int:
    """What makes a prompt's samples: an edit to any of these is a changed prompt. (One f-string and one
    blake2b call: this runs once per input row every night, ~1 us.)"""
    prompt = _NONE if row.prompt is None else row.prompt
    category = _NONE if row.category is None else row.category
    text = f"{prompt}\x1e{category}\x1e{row.seed}\x1e{row.num_samples}\x1e{bool(row.template)}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def plan_keys(rows: Iterable[PromptRow]) -> list[str]:
    """Each row's plan key: its prompt_id, or ``id\\x1fn`` for the n-th repeat of an id."""
    ids = [row.prompt_id for row in rows]
    if len(set(ids)) == len(ids):  # the usual table: every id once
        return ids
    seen: dict[str, int] = {}
    keys = []
    for row in rows:
        n = seen.get(row.prompt_id, 0)
        seen[row.prompt_id] = n + 1
        keys.append(row.prompt_id if n == 0 else f"{row.prompt_id}{_REPEAT}{n}")
    return keys


@dataclass
class Placement:
    """The plan of a run folder, as columns (entry i is one placed prompt)."""

    shard_size: int
    ids: list[str] = field(default_factory=list)
    shard: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    slot: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    digest: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    night: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    redone: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    retired: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    _index: dict[str, int] | None = field(default=None, repr=False, compare=False)

    @property
    def num_shards(self) -> int:
        return int(self.shard.max()) + 1 if len(self.shard) else 0

    def index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {pid: i for i, pid in enumerate(self.ids)}
        return self._index

    def retired_slots(self) -> dict[int, set[int]]:
        """shard -> slots of its retired prompts."""
        out: dict[int, set[int]] = {}
        for i in np.flatnonzero(self.retired):
            out.setdefault(int(self.shard[i]), set()).add(int(self.slot[i]))
        return out

    def retired_ids(self) -> set[str]:
        return {self.ids[i] for i in np.flatnonzero(self.retired)}

    def slots_of(self, shard: int) -> int:
        return int(np.count_nonzero(self.shard == shard))

    def to_table(self) -> pa.Table:
        cols = [pa.array(self.ids, pa.string()), self.shard, self.slot, self.digest, self.night, self.redone,
                self.retired]
        meta = {"referee_synth_placement": str(PLACEMENT_VERSION), "shard_size": str(self.shard_size)}
        return pa.Table.from_arrays([pa.array(c) if isinstance(c, np.ndarray) else c for c in cols],
                                    schema=PLACEMENT_SCHEMA.with_metadata(meta))

    @classmethod
    def from_table(cls, table: pa.Table) -> Placement:
        meta = table.schema.metadata or {}
        size = int(meta.get(b"shard_size", b"0"))
        col = {name: table.column(name).to_numpy() for name in PLACEMENT_SCHEMA.names if name != "prompt_id"}
        return cls(size, table.column("prompt_id").to_pylist(), col["shard"].astype(np.int32),
                   col["slot"].astype(np.int32), col["digest"].astype(np.int64), col["night"].astype(np.int32),
                   col["redone"].astype(np.int32), col["retired"].astype(np.int32))


@dataclass
class NightDiff:
    """Tonight's input against the plan. Row lists hold input row indices (``PromptRow.row`` order)."""

    night: int
    added: list[int] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # plan keys whose content digest differs
    removed: list[str] = field(default_factory=list)  # live plan keys absent from tonight's input
    restored: list[str] = field(default_factory=list)  # retired keys back in the input, unchanged
    new_shards: list[int] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"added": len(self.added), "changed": len(self.changed), "removed": len(self.removed),
                "restored": len(self.restored), "new_shards": len(self.new_shards)}


def diff(placement: Placement, rows: list[PromptRow], keys: list[str], night: int) -> tuple[NightDiff, list[int]]:
    """Compare tonight's rows to the plan; also returns each row's plan entry (-1: not placed yet)."""
    index = placement.index()
    out = NightDiff(night)
    where = [index.get(k, -1) for k in keys]
    seen = np.zeros(len(placement.ids), bool)
    digest, retired = placement.digest.tolist(), placement.retired.tolist()  # list lookups beat numpy scalars
    for row, key, i in zip(rows, keys, where):
        if i < 0:
            out.added.append(row.row)
            continue
        if row_digest(row) != digest[i]:
            out.changed.append(key)
        elif retired[i]:
            out.restored.append(key)
    placed = np.array(where, np.int64)
    seen[placed[placed >= 0]] = True
    gone = np.flatnonzero(~seen & (placement.retired == 0))
    out.removed = [placement.ids[i] for i in gone]
    return out, where


def extend(placement: Placement, rows: list[PromptRow], keys: list[str], added: list[int], night: int,
           shard_size: int) -> list[int]:
    """Place the added rows (input order) in new shards after the last; returns the new shard numbers."""
    if not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise UserError(f"shard size must be between 1 and {MAX_SHARD_SIZE}, got {shard_size}")
    if not added:
        return []
    first = placement.num_shards
    n = len(added)
    last = first + (n - 1) // shard_size
    if last >= 10**SHARD_DIGITS:  # the sample key names shards with SHARD_DIGITS digits
        raise UserError(f"placing {n} new prompts in shards of {shard_size} needs shard {last}, beyond the "
                        f"{10**SHARD_DIGITS} the sample key can name; raise --shard-size or use a new --output")
    pos = np.arange(n, dtype=np.int64)
    new_rows = [rows[i] for i in added]  # PromptRow.row is the row's index in tonight's list
    base = len(placement.ids)
    placement.ids += [keys[r] for r in added]
    placement.shard = np.concatenate([placement.shard, (first + pos // shard_size).astype(np.int32)])
    placement.slot = np.concatenate([placement.slot, (pos % shard_size).astype(np.int32)])
    placement.digest = np.concatenate([placement.digest, np.array([row_digest(r) for r in new_rows], np.int64)])
    placement.night = np.concatenate([placement.night, np.full(n, night, np.int32)])
    placement.redone = np.concatenate([placement.redone, np.zeros(n, np.int32)])
    placement.retired = np.concatenate([placement.retired, np.zeros(n, np.int32)])
    if placement._index is not None:
        placement._index.update((placement.ids[base + j], base + j) for j in range(n))
    return list(range(first, last + 1))


def accept_changes(placement: Placement, rows: list[PromptRow], keys: list[str], where: list[int],
                   changed: set[str], night: int) -> list[int]:
    """--redo-changed: record the edited prompts' new digests; returns the shards that hold them."""
    shards = set()
    for row, key, i in zip(rows, keys, where):
        if i >= 0 and key in changed:
            placement.digest[i] = row_digest(row)
            placement.redone[i] = night
            placement.retired[i] = 0
            shards.add(int(placement.shard[i]))
    return sorted(shards)


def set_retired(placement: Placement, keys: Iterable[str], night: int) -> None:
    """``night`` > 0 retires the prompts; 0 makes them live again."""
    index = placement.index()
    for key in keys:
        placement.retired[index[key]] = night


def shard_groups(placement: Placement, where: list[int]) -> list[tuple[int, list[int], list[int]]]:
    """(shard, slots, row indices) of tonight's rows per shard, shards ascending, slots ascending."""
    if not where:
        return []
    at = np.asarray(where, np.int64)
    shard, slot = placement.shard[at], placement.slot[at]
    order = np.lexsort((slot, shard))
    shard, slot = shard[order], slot[order]
    cuts = np.flatnonzero(np.diff(shard)) + 1
    starts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [len(order)]])
    order_l, slot_l, shard_l = order.tolist(), slot.tolist(), shard.tolist()
    return [(shard_l[a], slot_l[a:b], order_l[a:b]) for a, b in zip(starts.tolist(), ends.tolist())]


def read_placement(fs: pafs.FileSystem, out: str) -> Placement | None:
    path = storage.join(out, PLACEMENT_FILE)
    if not storage.exists(fs, path):
        return None
    try:
        # A native file, never Python bytes: the reader's pre-buffer futures can outlive read_table, and releasing a
        # Python-backed buffer on an Arrow I/O thread while the interpreter exits aborts the process
        # ("terminate called without an active exception": a refused night exited -6 instead of 2 under load).
        with fs.open_input_file(path) as handle:
            return Placement.from_table(pq.read_table(handle))
    except (pa.ArrowException, KeyError, ValueError) as err:
        raise UserError(f"output {out}: {PLACEMENT_FILE} cannot be read ({str(err).splitlines()[0][:120]}); "
                        "it records which shard every prompt has: restore it, or use a new --output") from None


def write_placement(fs: pafs.FileSystem, out: str, placement: Placement) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(placement.to_table(), sink, compression="zstd")
    storage.write_atomic(fs, storage.join(out, PLACEMENT_FILE), sink.getvalue().to_pybytes())
