"""``--generator sd_sampling`` through the whole job (real Ray, tiny models): contract, kill and resume, records."""

from __future__ import annotations

import json

import pytest

from tests.conftest import compbench_prompts
from tests.jobs.test_synthesize import (
    _check_complete_run,
    _env,
    _killed_after_first_shard_then_resumed,
    _prompts,
    _run,
    _stable,
    _tar_samples,
)

pytestmark = pytest.mark.slow


def test_sd_sampling_end_to_end_then_killed_and_resumed_gives_the_same(tmp_path, tiny_cache, shared_ray) -> None:
    prompts = compbench_prompts("shape_val", 6)
    path = _prompts(tmp_path / "p.parquet", prompts, category=["color", "shape"] * 3)
    args = ["--prompts", str(path), "--shard-size", "2", "--samples-per-prompt", "2", "--generator", "sd_sampling",
            "--set", "sampling.steps=4", "--set", "filter.thresholds={color: 0.0, shape: 1.0}"]
    expected = {(r, k) for r in range(6) for k in range(2)}
    two = _run([*args, "--output", str(tmp_path / "two"), "--num-actors", "2"], _env(tiny_cache, **shared_ray))
    assert two.returncode == 0, two.stderr[-3000:]
    side_two = _check_complete_run(tmp_path / "two", expected)
    assert {r["generator"] for r in side_two} == {"sd_sampling"}
    assert {r["status"] for r in side_two if r["category"] == "color"} == {"accepted"}
    assert all(r["iterations"] == 4 and r["itm_score"] is None for r in side_two)
    assert all(json.loads(s["json"])["generator"] == "sd_sampling" for s in _tar_samples(tmp_path / "two").values())
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["config"]["engine"]["generator"] == "sd_sampling" and run["config"]["sampling"]["steps"] == 4

    one = tmp_path / "one"
    again = _killed_after_first_shard_then_resumed(args, one, _env(tiny_cache, **shared_ray))
    assert "resuming:" in again.stderr
    assert _stable(_check_complete_run(one, expected)) == _stable(side_two)
    images = [{k: s["png"] for k, s in _tar_samples(out).items()} for out in (tmp_path / "two", one)]
    assert images[0] == images[1] and len(images[0]) == 6
    summary = json.loads((one / "summary.json").read_text())
    assert summary["categories"]["color"]["acceptance_rate"] == 1.0 and summary["seconds_per_accepted"] > 0


def test_sd15_preset_runs_on_the_tiny_set(tmp_path, tiny_cache, shared_ray) -> None:
    """configs/sd15.yaml itself, with the tiny models (and 64 px, 2 steps, to keep the CPU run short)."""
    path = _prompts(tmp_path / "p.parquet", compbench_prompts("color_val", 2))
    out = tmp_path / "run"
    job = ["--prompts", str(path), "--output", str(out), "--config", "configs/sd15.yaml", "--num-actors", "1",
           "--set", "models.tiny=true", "--set", "models.device=cpu", "--set", "job.gpus_per_actor=0",
           "--set", "latent.size=8", "--set", "sampling.steps=2", "--threshold", "0.0"]
    proc = _run(job, _env(tiny_cache, **shared_ray))
    assert proc.returncode == 0, proc.stderr[-3000:]
    side = _check_complete_run(out, {(0, 0), (1, 0)})
    assert {(r["generator"], r["iterations"], r["status"]) for r in side} == {("sd_sampling", 2, "accepted")}
