"""``--generator cascade`` through the whole job (real Ray, tiny models): per-prompt stages, keys, and a
SIGKILL while a shard is in its second stage.

Acceptance on random weights is noise, so the test sets it: color prompts threshold 0 (accepted), shape
prompts threshold 1 (never), and prompt p2's sampling always fails (a NaN at step 9 of 10, which the tiny
inversion's 8 iterations never reach), so p2 needs inversion for all of its target.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, compbench_prompts
from tests.jobs.test_synthesize import SYNTH, _check_complete_run, _env, _prompts, _run, _stable, _tar_samples

pytestmark = pytest.mark.slow

K, SAMPLING_BUDGET, INVERSION_BUDGET = 2, 3, 2
STAGES = (f"cascade.stages=[{{generator: sd_sampling, max_samples: {SAMPLING_BUDGET}}}, "
          f"{{generator: inversion, max_samples: {INVERSION_BUDGET}, batch_size: 2}}]")
CATEGORIES = ["color", "shape"] * 3
FAILING = "p2"  # a color prompt whose sampling never gives an image
ALL = SAMPLING_BUDGET + INVERSION_BUDGET
# (row, sample_index) of every sample: color rows 0 and 4 met by sampling; p2 and the shape rows spend everything.
EXPECTED = {(r, k) for r in (0, 4) for k in range(K)} | {(r, k) for r in (1, 2, 3, 5) for k in range(ALL)}


def _args(tmp: Path) -> list[str]:
    path = _prompts(tmp / "p.parquet", compbench_prompts("color_val", 6), category=CATEGORIES,
                    prompt_id=[f"p{i}" for i in range(6)])
    return ["--prompts", str(path), "--shard-size", "2", "--generator", "cascade", "--target-accepted", str(K),
            "--set", STAGES, "--set", "sampling.steps=10", "--set", "filter.thresholds={color: 0.0, shape: 1.0}"]


def _job_env(tiny_cache: Path, shared_ray: dict, **extra: str) -> dict[str, str]:
    return _env(tiny_cache, **shared_ray, REFEREE_SYNTH_INJECT_NAN=f"{FAILING}:9", **extra)


@pytest.fixture(scope="module")
def cascade_run(tmp_path_factory, tiny_cache, shared_ray):
    """One cascade run on two actors, shared by the read-only checks below."""
    tmp = tmp_path_factory.mktemp("cascade")
    out = tmp / "two"
    proc = _run([*_args(tmp), "--output", str(out), "--num-actors", "2"], _job_env(tiny_cache, shared_ray))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, out, _check_complete_run(out, EXPECTED)


def _by_prompt(side: list[dict]) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for r in sorted(side, key=lambda r: (r["row"], r["sample_index"])):
        out.setdefault(r["prompt_id"], []).append((r["sample_index"], r["generator"], r["stage"], r["status"]))
    return out


def test_prompts_met_by_sampling_never_invert_and_a_short_one_inverts_exactly_the_rest(cascade_run) -> None:
    _, out, side = cascade_run
    made = _by_prompt(side)
    for pid in ("p0", "p4"):
        assert made[pid] == [(k, "sd_sampling", 1, "accepted") for k in range(K)]
    assert made[FAILING] == [(k, "sd_sampling", 1, "failed") for k in range(SAMPLING_BUDGET)] + [
        (k, "inversion", 2, "accepted") for k in range(SAMPLING_BUDGET, SAMPLING_BUDGET + K)]
    for pid in ("p1", "p3", "p5"):
        assert made[pid] == [(k, "sd_sampling", 1, "rejected") for k in range(SAMPLING_BUDGET)] + [
            (k, "inversion", 2, "rejected") for k in range(SAMPLING_BUDGET, ALL)]
    tars = _tar_samples(out)
    meta = {k: json.loads(s["json"]) for k, s in tars.items()}
    assert {(m["prompt_id"], m["generator"], m["stage"]) for m in meta.values()} == {
        ("p0", "sd_sampling", 1), ("p4", "sd_sampling", 1), (FAILING, "inversion", 2)}
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["engine"]["generator"] == "cascade"
    assert [s["generator"] for s in run["config"]["cascade"]["stages"]] == ["sd_sampling", "inversion"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accepted"] == 3 * K and summary["short_prompts_total"] == 3


def test_keys_are_unique_and_the_same_after_a_sigkill_in_the_second_stage(cascade_run, tiny_cache,
                                                                          shared_ray) -> None:
    """One actor; shard 1 (p2, p3) held at its 2nd progress report, after its first inversion batch with
    more inversion to come; the driver is SIGKILLed there; the rerun gives every sample exactly once, the
    same records and the same accepted images as the two-actor run."""
    tmp, two, side_two = cascade_run
    one = tmp / "one"
    go = tmp / "go"
    env = _job_env(tiny_cache, shared_ray, REFEREE_SYNTH_PAUSE_SHARD=f"1/2:{go}")
    cmd = [sys.executable, SYNTH, "--config", "configs/tiny.yaml", "--no-progress", *_args(tmp), "--output", str(one),
           "--num-actors", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not Path(f"{go}.waiting").exists() and proc.poll() is None:
            time.sleep(0.1)
        assert Path(f"{go}.waiting").exists(), "shard 1 never reached its second progress report"
        assert not (one / "shards" / "000001.stats.json").exists()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(2)
    again = _run([*_args(tmp), "--output", str(one), "--num-actors", "1"], _job_env(tiny_cache, shared_ray))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming:" in again.stderr
    side_one = _check_complete_run(one, EXPECTED)
    assert _stable(side_one) == _stable(side_two)
    images = [{k: s["png"] for k, s in _tar_samples(out).items()} for out in (two, one)]
    assert images[0] == images[1] and len(images[0]) == 3 * K


def test_summary_card_and_report_split_by_generator_and_category(cascade_run, tmp_path) -> None:
    _, out, side = cascade_run
    gens = json.loads((out / "summary.json").read_text())["generators"]
    assert set(gens) == {"sd_sampling", "inversion"}
    for gen, g in gens.items():
        mine = [r for r in side if r["generator"] == gen and r["status"] != "invalid_input"]
        for cat in ("color", "shape"):
            rows = [r for r in mine if r["category"] == cat]
            c = g["categories"][cat]
            assert (c["samples"], c["accepted"]) == (len(rows), sum(r["status"] == "accepted" for r in rows))
            assert c["seconds"] == pytest.approx(sum(r["seconds"] for r in rows), abs=0.01)
        assert g["seconds"] == pytest.approx(sum(r["seconds"] for r in mine), abs=0.01)
        assert g["seconds_per_accepted"] == pytest.approx(g["seconds"] / g["accepted"], rel=1e-3)
    assert gens["sd_sampling"]["categories"]["color"]["accepted"] == 4
    assert gens["inversion"]["categories"]["color"]["accepted"] == 2
    assert gens["sd_sampling"]["share"] == pytest.approx(4 / 6, abs=1e-4)
    assert gens["inversion"]["categories"]["color"]["share"] == pytest.approx(2 / 6, abs=1e-4)
    assert gens["inversion"]["categories"]["shape"]["share"] is None  # no shape image accepted at all
    card = (out / "README.md").read_text()
    assert "| sd_sampling | color | 4 |" in card and "| inversion | color | 2 |" in card and "33.3%" in card

    from jobs import report

    assert report.main(["--run", str(out), "--samples", "4", "--output", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Per generator and category" in page
    assert "<td>color</td><td>inversion</td><td>2</td><td>2</td><td>100.0%</td>" in page  # p2's two inversions


def test_export_gors_and_finetune_stream_select_by_generator(cascade_run, tmp_path) -> None:
    from jobs import export_gors
    from pipeline.io.reader import finetune_stream

    _, out, side = cascade_run
    prompt = {r["prompt_id"]: r["prompt"] for r in side}
    for gen, pids in (("sd_sampling", ["p0", "p0", "p4", "p4"]), ("inversion", [FAILING, FAILING])):
        dest = tmp_path / gen
        assert export_gors.main(["--run", str(out), "--output", str(dest), "--generator", gen]) == 0
        names = sorted(p.name.rsplit("_", 1)[0] for p in (dest / "samples").iterdir())
        assert names == sorted(prompt[p] for p in pids)
        captions = sorted(c for _, c, _ in finetune_stream(str(out), generators=[gen]))
        assert captions == sorted(prompt[p] for p in pids)
    assert len(list(finetune_stream(str(out)))) == 3 * K
