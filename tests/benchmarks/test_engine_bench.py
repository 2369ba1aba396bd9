"""benchmarks/engine.py --quick on the tiny models, and benchmarks/gpu.py's CPU dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

THROUGHPUT_KEYS = {"images_per_second", "speedup_vs_reference_authors", "speedup_vs_reference_plain",
                   "peak_rss_mb", "peak_rss_increase_mb"}
VARIANTS = {"engine_b1", "engine_b2", "engine_b4", "reference_authors", "reference_plain"}


def _bench(args: list[str], tiny_cache: Path, timeout: int) -> dict:
    env = dict(os.environ, REFEREE_SYNTH_CACHE=str(tiny_cache), HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, "benchmarks/engine.py", "--quick", "--json", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_engine_quick_throughput_keys(tiny_cache) -> None:
    r = _bench(["--skip-job"], tiny_cache, timeout=300)
    assert THROUGHPUT_KEYS <= set(r["throughput"]) and set(r["throughput"]["images_per_second"]) == VARIANTS
    assert r["batch4_speedup"] > 0 and r["batch4_speedup_vs_plain_reference"] > 0
    assert r["targets"]["overhead_met"] is None and "overhead_ratio" not in r
    assert r["targets"]["apply"] is False  # the targets are stated for the small set


@pytest.mark.skipif(not os.environ.get("REFEREE_SYNTH_BENCH_JOB"),
                    reason="starts Ray, runs the job on 16 prompts (30-50 s on 2 cores): REFEREE_SYNTH_BENCH_JOB=1")
def test_engine_quick_with_the_job(tiny_cache) -> None:
    r = _bench([], tiny_cache, timeout=600)
    assert r["overhead_ratio"] > 1.0 and r["overhead"]["job"]["samples"] == 16
    assert {"batch4_speedup", "overhead_fraction", "peak_memory_mb", "targets"} <= set(r)


def test_gpu_dry_run_with_an_injected_oom(tmp_path, tiny_cache, monkeypatch) -> None:
    from benchmarks import gpu
    from pipeline.engine.invert import INJECT_OOM_ENV

    monkeypatch.setenv("REFEREE_SYNTH_CACHE", str(tiny_cache))
    monkeypatch.setenv(INJECT_OOM_ENV, "2")  # more than 2 view rows per referee pass "do not fit"
    out = tmp_path / "gpu.json"
    threads = torch.get_num_threads()
    try:
        assert gpu.main(["--dry-run", "--out", str(out), "--batches", "1", "--view-chunks", "0,2",
                         "--skip-reference"]) == 0
    finally:
        torch.set_num_threads(threads)
    r = json.loads(out.read_text())
    assert r["dry_run"] and r["errors"] == []
    by_chunk = {c["view_chunk"]: c for c in r["configs"]}
    assert by_chunk[0]["status"] == "oom" and by_chunk[2]["status"] == "ok"
    assert by_chunk[2]["seconds_per_image"] > 0 and by_chunk[2]["engine_tflops"] > 0
    fb = r["oom_fallback_run"]
    assert fb["status"] == "ok" and fb["final_view_chunk"] == 2 and fb["oom_fallbacks"]
    assert r["floor"]["flops_per_image"] > 0 and r["summary"]["best_batch"] == 1


def test_gpu_real_model_set_builds_on_meta() -> None:
    from benchmarks.gpu import real_model_sets
    from pipeline.config import Config
    from pipeline.referees.blip2 import Referee

    gen, vqa = real_model_sets(torch.device("meta"), torch.float32)
    assert gen.referee.config.vision_config.num_hidden_layers == 39
    ref = Referee(gen, Config().referee)
    assert ref.image_size == 224 and ref.num_queries == 32
    ids = ref.token_ids("a red car and a blue bird")
    assert len(ids) == 9 and max(ids) < gen.referee.config.qformer_config.vocab_size
    assert vqa.model.config.vision_config.image_size == 480
