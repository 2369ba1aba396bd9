"""Nightly runs into one folder (real Ray head, tiny models, real tar and Parquet files): one scenario of
five invocations, asserted on by the tests below.

  inv 1  night 1: p0..p5                                  -> shards 0, 1, 2
  inv 2  night 2: p0..p13 appended, SIGKILLed mid-night   -> shards 3..6 placed, some complete
  inv 3  the same command again                           -> the rest of 3..6; every sample once
  --     night 3 with p6, p8 edited, p3 removed, p14, p15 new: refused (exit 2) naming p6 and p8
  inv 4  the same with --redo-changed                     -> exactly shards 3, 4 (p6, p8) and new shard 7
  inv 5  the same with --drop-removed                     -> no shard runs; p3 retired from the listings
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, compbench_prompts
from tests.jobs.test_synthesize import SYNTH, _env, _run, _sidecars, _tar_samples

pytestmark = pytest.mark.slow
PROMPTS = compbench_prompts("color_val", 16)


def _table(path: Path, ids: list[int], edits: dict[int, dict] | None = None) -> Path:
    edits = edits or {}
    rows = [{"prompt": PROMPTS[i], "prompt_id": f"p{i}", "category": "color", **edits.get(i, {})} for i in ids]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.parts[len(run.parts)] in ("shards", "rejected")}


def _history(run: Path) -> list[dict]:
    return json.loads((run / "run.json").read_text())["history"]


@pytest.fixture(scope="module")
def nights(tmp_path_factory, tiny_cache, shared_ray) -> dict:
    tmp = tmp_path_factory.mktemp("nightly")
    run = tmp / "run"
    env = _env(tiny_cache, **shared_ray)
    base = ["--output", str(run), "--num-actors", "1", "--shard-size", "2", "--threshold", "0"]
    seen: dict = {"run": run, "tmp": tmp}

    one = _run(["--prompts", str(_table(tmp / "n1.parquet", list(range(6)))), *base], env)
    assert one.returncode == 0, one.stderr[-3000:]
    seen["after1"] = _files(run)

    night2 = ["--prompts", str(_table(tmp / "n2.parquet", list(range(14)))), *base]
    proc = subprocess.Popen([sys.executable, SYNTH, "--config", "configs/tiny.yaml", "--no-progress", *night2],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    new = [run / "shards" / f"{s:06d}.stats.json" for s in range(3, 7)]
    deadline = time.time() + 240
    while time.time() < deadline and not any(p.exists() for p in new):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)  # the killed driver's actors die with it; whatever they published counts as done
    seen["killed_with"] = sum(p.exists() for p in new)
    again = _run(night2, env)
    assert again.returncode == 0, again.stderr[-3000:]
    seen["after2"] = _files(run)

    ids3 = [i for i in range(16) if i != 3]
    edits = {6: {"prompt": "a purple velvet chair"}, 8: {"category": "texture"}}
    night3 = ["--prompts", str(_table(tmp / "n3.parquet", ids3, edits)), *base]
    before = {n: (run / n).read_bytes() for n in ("run.json", "placement.parquet")}
    seen["refused"] = _run(night3, env)
    seen["refused_touched"] = [n for n, data in before.items() if (run / n).read_bytes() != data]
    four = _run([*night3, "--redo-changed"], env)
    assert four.returncode == 0, four.stderr[-3000:]
    seen["stderr4"] = four.stderr
    seen["after3"] = _files(run)
    shutil.copytree(run, tmp / "union")  # the folder as night 3 left it, for the readers

    five = _run([*night3, "--drop-removed"], env)
    assert five.returncode == 0, five.stderr[-3000:]
    seen["stderr5"] = five.stderr
    return seen


def test_night_one_files_stay_byte_for_byte_through_every_later_night(nights) -> None:
    after1, final = nights["after1"], _files(nights["run"])
    assert after1 and {k: final[k] for k in after1} == after1
    # Night 2's shards the edits did not touch are untouched by night 3 too.
    for shard in ("000005", "000006"):
        assert {k: v for k, v in nights["after3"].items() if shard in k} == \
            {k: v for k, v in nights["after2"].items() if shard in k}
    assert {k: v for k, v in nights["after3"].items() if "000003" in k} != \
        {k: v for k, v in nights["after2"].items() if "000003" in k}


def test_every_sample_exactly_once_after_a_sigkill_and_keys_never_repeat(nights) -> None:
    assert nights["killed_with"] < 4, "the kill landed after night 2 was done"
    side = _sidecars(nights["run"])
    pairs = [(r["prompt_id"], r["sample_index"]) for r in side]
    assert sorted(pairs) == sorted((f"p{i}", 0) for i in range(16))  # p3's samples stay (files are kept)
    keys = [r["key"] for r in side]
    assert all(k.isdigit() and len(k) == 13 for k in keys) and len(set(keys)) == len(keys)
    # A prompt's key is its placement, not its row: p4 is row 3 of night 3's table and keeps night 1's key.
    by_id = {r["prompt_id"]: r for r in side}
    assert by_id["p4"]["key"] == "0000020000000" and by_id["p15"]["key"] == "0000070000100"
    accepted = {r["key"] for r in side if r["status"] == "accepted"}
    assert accepted and set(_tar_samples(nights["run"])) == accepted  # a glob of shards/*.tar: every sample


def test_each_night_did_only_its_own_shards(nights) -> None:
    history = _history(nights["run"])
    assert [h["night"] for h in history] == [1, 2, 3, 4, 5]
    assert history[0]["shards_run"] == [0, 1, 2] and history[0]["prompts"]["added"] == 6
    assert history[1]["new_shards"] == [3, 4, 5, 6] and history[1]["finished_at"] is None  # the killed one
    assert history[1]["prompts"] == {"added": 8, "changed": 0, "removed": 0, "retired": 0, "restored": 0}
    assert set(history[2]["shards_run"]) | set(range(3, 7)) == set(range(3, 7)) and history[2]["prompts"]["added"] == 0
    assert len(history[2]["shards_run"]) == 4 - nights["killed_with"]
    assert history[3]["shards_run"] == [3, 4, 7] and history[3]["redone_shards"] == [3, 4]
    assert history[3]["prompts"] == {"added": 2, "changed": 2, "removed": 1, "retired": 0, "restored": 0}
    assert history[4]["shards_run"] == [] and history[4]["prompts"]["retired"] == 1
    assert all(h["code_version"] and h["input"]["content_sha256"] for h in history)
    # Every record names the night that made it: night 1's shards kept night 1's records.
    side = _sidecars(nights["run"])
    made = {}
    for r in side:
        made.setdefault(r["night"], set()).add(r["shard"])
    assert made[1] == {0, 1, 2} and made[4] == {3, 4, 7}
    assert made.get(2, set()) | made.get(3, set()) == {5, 6}
    assert sum(r["night"] == 4 for r in side) == 6  # p6, p7, p8, p9, p14, p15: nothing else was redone
    nights_summary = json.loads((nights["run"] / "summary.json").read_text())["nights"]
    assert nights_summary["1"]["shards"] == 3 and nights_summary["4"]["samples"] == 6


def test_edits_are_refused_by_id_and_redo_changed_redoes_exactly_their_shards(nights) -> None:
    refused = nights["refused"]
    assert refused.returncode == 2, refused.stderr[-2000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert "'p6', 'p8' (2 in all)" in line and "--redo-changed" in line and "Traceback" not in refused.stderr
    assert nights["refused_touched"] == []
    side = {r["prompt_id"]: r for r in _sidecars(nights["run"])}
    assert side["p6"]["prompt"] == "a purple velvet chair" and side["p8"]["category"] == "texture"
    assert "2 changed, redone in shard(s) 000003, 000004" in nights["stderr4"]


def test_readers_see_the_union_and_drop_removed_retires_a_prompt(nights, tiny_cache, tmp_path) -> None:
    import datasets

    union, run = nights["tmp"] / "union", nights["run"]
    every = {r["key"] for r in _sidecars(union) if r["status"] == "accepted"}
    p3 = {r["key"] for r in _sidecars(union) if r["prompt_id"] == "p3"}
    assert p3 <= every
    for folder, want in ((union, every), (run, every - p3)):
        ds = datasets.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / f"hf-{folder.name}"))
        assert sorted(ds["__key__"]) == sorted(want)
        out = tmp_path / f"gors-{folder.name}"
        proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "export_gors.py"), "--run", str(folder),
                               "--output", str(out)], cwd=ROOT, env=_env(tiny_cache), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert len(list((out / "samples").glob("*.png"))) == len(want)
        prompts = (out / "dataset.txt").read_text().splitlines()
        assert (PROMPTS[3] in prompts) == (folder == union)
    # Retired, not deleted: shard 1's files are night 1's bytes; shards.txt names a filtered copy instead.
    listed = (run / "shards.txt").read_text().splitlines()
    assert [u for u in listed if "000001" in u] and all("filtered/000001-" in u for u in listed if "000001" in u)
    assert len(listed) == 8 and not listed[0].startswith("#")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["retired_prompts"] == 1 and summary["retired_accepted"] == len(p3)
    assert "retired (--drop-removed; files kept)" in nights["stderr5"]


def test_report_shows_totals_per_night(nights, tmp_path) -> None:
    from jobs.report import night_rows
    from pipeline.io.reader import sidecar_records

    rows = {r["night"]: r for r in night_rows(sidecar_records(str(nights["run"])), _history(nights["run"]))}
    assert rows[1]["samples"] == 5 and rows[1]["added"] == 6  # p3 retired: out of the dataset's counts
    assert rows[4]["samples"] == 6 and rows[4]["changed"] == 2 and rows[4]["shards_run"] == 3
    assert rows[2]["finished"] is False and rows[5]["retired"] == 1


def test_plan_on_a_placed_folder_estimates_only_tonights_work(tmp_path, capsys) -> None:
    """--plan (no Ray) on a folder whose placement holds p0..p3 (shards 0, 1): p5 and p6 are new (one new
    shard), p2 is edited (its shard 1 would be redone, p3 with it)."""
    from jobs.synthesize import main
    from pipeline.io.nightly import NightOptions, commit_night, plan_night
    from pipeline.io.prompt_files import read_prompt_tables
    from pipeline.io.storage import filesystem_for
    from schemas.prompts import validate_rows

    run = tmp_path / "run"
    fs, out = filesystem_for(str(run))
    fs.create_dir(out, recursive=True)
    rows = validate_rows(read_prompt_tables(str(_table(tmp_path / "n1.parquet", [0, 1, 2, 3])))[1], 1, 1000, 200)
    commit_night(fs, out, plan_night(fs, out, rows, 2, None, "sha", NightOptions(), str(run)))
    grown = _table(tmp_path / "n2.parquet", [0, 1, 2, 3, 5, 6], {2: {"prompt": "a gold spoon"}})
    args = ["--plan", "--prompts", str(grown), "--output", str(run), "--config", str(ROOT / "configs" / "paper.yaml"),
            "--shard-size", "2"]
    assert main(args) == 0
    plan = json.loads((run / "plan.json").read_text())
    assert plan["valid_prompts"] == 4 and plan["shards"] == 2
    assert "2 of these 6 prompts need nothing more there" in capsys.readouterr().err
