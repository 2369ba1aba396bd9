"""One night (invocation) of a growing run folder: diff tonight's table against the recorded placement,
place the new prompts, decide what runs, and keep run.json's history.

What a night does with each kind of row (docs/ARCHITECTURE.md "Nightly runs"):
- new prompt_id: placed in new shards after the last (pipeline/io/placement.py), and run;
- unchanged: nothing (its shard is complete) or resumed (its shard is not);
- edited (same prompt_id, other text/category/seed/num_samples/template): refused, naming the ids,
  unless ``redo_changed``: then exactly the shards holding them are redone (their markers go first);
- removed (placed, absent tonight): its samples stay by default; ``drop_removed`` retires it: shards.txt,
  the dataset card, the GORS export and the finetuning stream leave it out; its files stay;
- a retired prompt back in the table, unchanged: live again (its samples were never deleted).
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from pipeline.errors import UserError
from pipeline.io import placement as pl
from pipeline.io import storage
from pipeline.io.shards import ShardSpec, shard_paths
from schemas.prompts import PromptRow

_LIST = 10  # ids named in a refusal


@dataclass(frozen=True)
class NightOptions:
    redo_changed: bool = False
    drop_removed: bool = False


@dataclass
class Night:
    """What tonight runs: every shard that holds tonight's rows (complete ones are skipped by the caller)."""

    number: int
    placement: pl.Placement
    diff: pl.NightDiff
    specs: list[ShardSpec]
    redo_shards: list[int] = field(default_factory=list)
    retired_now: list[str] = field(default_factory=list)
    lost_by_redo: list[str] = field(default_factory=list)  # removed prompts in a redone shard: not remade

    def history_entry(self, fingerprint: dict[str, Any], code_version: str, started_at: str) -> dict[str, Any]:
        d = self.diff
        return {
            "night": self.number, "started_at": started_at, "finished_at": None, "code_version": code_version,
            "input": {"content_sha256": fingerprint.get("content_sha256"), "total_rows": fingerprint.get("total_rows"),
                      "files": len(fingerprint.get("files") or [])},
            "prompts": {"added": len(d.added), "changed": len(d.changed), "removed": len(d.removed),
                        "retired": len(self.retired_now), "restored": len(d.restored)},
            "new_shards": d.new_shards, "redone_shards": self.redo_shards,
            "shards_run": [], "shards_failed": [],
        }


def night_number(old_run: dict[str, Any] | None) -> int:
    """1 for a new folder; a folder made before history was kept counts as night 1."""
    if old_run is None:
        return 1
    return len(old_run.get("history") or [None]) + 1


def _named(ids: list[str]) -> str:
    shown = ", ".join(repr(i.split("\x1f")[0]) for i in ids[:_LIST])
    return f"{shown}{', ...' if len(ids) > _LIST else ''} ({len(ids)} in all)"


def plan_night(
    fs: pafs.FileSystem, out: str, rows: list[PromptRow], shard_size: int, old_run: dict[str, Any] | None,
    content_sha256: str, opts: NightOptions, output_uri: str,
) -> Night:
    """Read the placement (or start one), diff tonight's rows, place the new ones. Writes nothing."""
    paused = gc.isenabled()
    gc.disable()  # a million rows' worth of new objects: collections would rescan them all, to free nothing
    try:
        return _plan_night(fs, out, rows, shard_size, old_run, content_sha256, opts, output_uri)
    finally:
        if paused:
            gc.enable()


def _plan_night(
    fs: pafs.FileSystem, out: str, rows: list[PromptRow], shard_size: int, old_run: dict[str, Any] | None,
    content_sha256: str, opts: NightOptions, output_uri: str,
) -> Night:
    number = night_number(old_run)
    placement = pl.read_placement(fs, out) if old_run is not None else None
    if placement is None:
        placement = pl.Placement(shard_size)
        if old_run is not None and (old_run.get("input") or {}).get("content_sha256") != content_sha256:
            # Made before placements were recorded: its plan was positional over its own input, which is gone.
            raise UserError(f"output {output_uri} holds a run made before prompt placement was recorded, and the "
                            "input prompts differ (their content); rerun it once on its own input, or use a new "
                            "--output, or --force to redo every shard")
    elif placement.shard_size != shard_size:
        raise UserError(f"output {output_uri} was planned with shards of {placement.shard_size}, not {shard_size}; "
                        "use a new --output, or --force to redo every shard")
    keys = pl.plan_keys(rows)
    diff, where = pl.diff(placement, rows, keys, number)
    if diff.changed and not opts.redo_changed:
        raise UserError(f"output {output_uri}: prompts changed since their samples were made (same prompt_id, other "
                        f"text, category, seed or num_samples): {_named(diff.changed)}; rerun with --redo-changed to "
                        "redo the shards holding them, or give the edits new prompt_ids")
    night = Night(number, placement, diff, [])
    if diff.changed:
        night.redo_shards = pl.accept_changes(placement, rows, keys, where, set(diff.changed), number)
        redo, index = set(night.redo_shards), placement.index()
        night.lost_by_redo = [k for k in diff.removed if int(placement.shard[index[k]]) in redo]
    if diff.restored:
        pl.set_retired(placement, diff.restored, 0)
    if diff.removed and opts.drop_removed:
        pl.set_retired(placement, diff.removed, number)
        night.retired_now = list(diff.removed)
    base = len(placement.ids)
    diff.new_shards = pl.extend(placement, rows, keys, diff.added, number, shard_size)
    for j, r in enumerate(diff.added):  # the added rows' entries follow the old ones, in input order
        where[r] = base + j
    night.specs = [ShardSpec(shard, [rows[i] for i in members], slots, number)
                   for shard, slots, members in pl.shard_groups(placement, where)]
    return night


def say(night: Night, default_ids: int, appending: bool) -> None:
    """One line per kind of change, and the row-number-id warning on an append."""
    d = night.diff
    if appending and default_ids:
        print(f"warning: {default_ids} rows have no prompt_id, so their id is their row number: a row inserted or "
              "deleted above them renumbers the rest, which then read as edited or new prompts; give a growing "
              "table an explicit prompt_id column", file=sys.stderr)
    if not appending:
        return
    parts = [f"{len(d.added)} new prompt(s) in {len(d.new_shards)} new shard(s)"]
    if d.changed:
        parts.append(f"{len(d.changed)} changed, redone in shard(s) {_shards(night.redo_shards)}")
    if d.removed:
        kept = "retired (--drop-removed; files kept)" if night.retired_now else "kept (--drop-removed retires them)"
        parts.append(f"{len(d.removed)} removed from the table: {kept}")
    if d.restored:
        parts.append(f"{len(d.restored)} retired prompt(s) back in the table: live again")
    print(f"night {night.number}: " + "; ".join(parts), file=sys.stderr)
    if night.lost_by_redo:
        print(f"warning: the redone shards also hold prompts removed from the table: {_named(night.lost_by_redo)}; "
              "the redo cannot remake them, so their earlier samples leave the dataset with it", file=sys.stderr)


def _shards(shards: list[int]) -> str:
    shown = ", ".join(f"{s:06d}" for s in shards[:_LIST])
    return shown + (f", ... ({len(shards)})" if len(shards) > _LIST else "")


def commit_night(fs: pafs.FileSystem, out: str, night: Night) -> None:
    """Before any shard runs: the redone shards lose their markers (they are no longer complete), then the
    placement is published. A crash in between leaves the edits unaccepted: the rerun asks again."""
    for shard in night.redo_shards:
        marker = shard_paths(out, shard)["stats"]
        if storage.exists(fs, marker):
            fs.delete_file(marker)
    pl.write_placement(fs, out, night.placement)


def start_night(
    fs: pafs.FileSystem, out: str, info: Any, rows: list[PromptRow], force: bool, opts: NightOptions,
    output_uri: str, default_ids: int = 0,
) -> tuple[Night, list[ShardSpec]]:
    """Under the run lease: check run.json's config (``--force`` clears a different one), plan the night,
    publish the placement, append the night to run.json's history. Returns the night and the shards to run
    (tonight's shards without a complete marker)."""
    from pipeline.io.run_folder import check_run, write_run_info
    from pipeline.io.shards import shard_is_complete

    old = check_run(fs, out, info, force, output_uri)
    night = plan_night(fs, out, rows, info.shard_size, old, info.input.get("content_sha256", ""), opts, output_uri)
    say(night, default_ids, appending=old is not None)
    commit_night(fs, out, night)
    todo = [s for s in night.specs if not shard_is_complete(fs, out, s.shard, info.config_hash)]
    history = list((old or {}).get("history") or [])
    if old is not None and not history:  # a folder made before the history was kept
        history.append({"night": 1, "note": "made before run.json kept a history"})
    entry = night.history_entry(info.input, info.code_version, info.updated_at)
    entry["shards_run"] = [s.shard for s in todo]
    info.history = [*history, entry]
    info.num_shards = night.placement.num_shards
    if old is not None:
        info.created_at = old.get("created_at", info.created_at)
    write_run_info(fs, out, info)
    return night, todo


def finish_night(fs: pafs.FileSystem, out: str, info: Any, completed: set[int], failed: list[int]) -> None:
    """Close tonight's history entry: when it ended, which of its shards completed and which failed."""
    from pipeline.io.run_folder import now, write_run_info

    if not info.history:
        return
    entry = info.history[-1]
    entry["finished_at"] = now()
    entry["shards_failed"] = sorted(failed)
    entry["shards_completed"] = sorted(s for s in entry.get("shards_run", []) if s in completed)
    info.updated_at = entry["finished_at"]
    write_run_info(fs, out, info)


def pending_work(fs: pafs.FileSystem, out: str, rows: list[PromptRow], shard_size: int
                 ) -> tuple[list[PromptRow], int] | None:
    """``--plan`` on a folder that already has a placement: the rows tonight would run (new prompts, and edited
    ones as if --redo-changed; the redone shards' other prompts too) and their shard count. None: no placement."""
    placement = pl.read_placement(fs, out)
    if placement is None:
        return None
    keys = pl.plan_keys(rows)
    diff, where = pl.diff(placement, rows, keys, 0)
    changed = set(diff.changed)
    redo = {int(placement.shard[i]) for k, i in zip(keys, where) if k in changed}
    todo = [r for r, i in zip(rows, where) if i < 0 or int(placement.shard[i]) in redo]
    return todo, -(-len(diff.added) // shard_size) + len(redo)
