"""A monitored shard on the tiny models with the run's real scorer: records, refill, accounting, resume."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.prompts import prompt_table
from jobs.score import score_samples, shard_samples
from pipeline.io.compbench_data import COMPBENCH_DIR
from pipeline.io.shards import ShardSpec, shard_paths
from pipeline.io.storage import filesystem_for
from pipeline.process_shard import ShardProcessor
from pipeline.scoring.vqa import format_score
from schemas.prompts import validate_rows

EVERY = 2


def _cfg(base):
    cfg = copy.deepcopy(base)
    cfg.job.samples_per_prompt = 2
    cfg.engine.batch_size = 2
    cfg.augment.num_views = 2
    cfg.monitor.enabled = True
    cfg.monitor.every = EVERY
    cfg.monitor.patience = 1
    cfg.monitor.margin = 0.0
    cfg.filter.thresholds = {"color": 0.0}  # every tiny-model score clears it: each sample exits at its first check
    return cfg


def _rows(cfg, n=2):
    table = prompt_table([COMPBENCH_DIR / "color_val.txt"]).slice(0, n)
    return validate_rows([table], 2, cfg.job.max_prompt_chars, cfg.job.max_prompt_id_chars)


def _process(cfg, generator_models, vqa_models, out, n=2) -> tuple[list[dict], object]:
    fs, root = filesystem_for(str(out))
    fs.create_dir(f"{root}/shards", recursive=True)
    stats = ShardProcessor(cfg, generator_models, vqa_models, {"vqa": "tiny"}).process(ShardSpec(0, _rows(cfg, n)), fs,
                                                                                        root)
    (Path(root) / "run.json").write_text(json.dumps({"config_hash": cfg.hash()}))  # as the driver writes it
    return pq.read_table(shard_paths(root, 0)["parquet"]).to_pylist(), stats


@pytest.fixture(scope="module")
def exits(tiny_cfg, generator_models, vqa_models, tmp_path_factory):
    cfg = _cfg(tiny_cfg)
    out = tmp_path_factory.mktemp("monitored")
    side, stats = _process(cfg, generator_models, vqa_models, out)
    return cfg, out, side, stats


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "score_seconds", "monitor_seconds")} for r in rows]


def test_exited_samples_record_their_run_and_the_score_of_their_stored_image(exits, vqa_models):
    from pipeline.scoring.vqa import VqaScorer

    cfg, out, side, _ = exits
    tail = cfg.optim.tail_iterations
    assert len(side) == 4
    for r in side:
        assert r["exit_reason"] == "early_exit" and r["iterations"] == EVERY + tail
        assert [t["iteration"] for t in r["monitor_trace"]] == [EVERY] and r["monitor_seconds"] > 0
        assert r["best_iteration"] is None and r["status"] == "accepted"
    rescored = {rec["key"]: rec for rec in score_samples(shard_samples(out), VqaScorer(vqa_models, cfg), cfg)}
    for r in side:  # the recorded score is the benchmark's score of the file in the tar
        assert format_score(rescored[r["key"]]["score"], 4) == format_score(r["vqa_score"], 4)


def test_the_marker_counts_what_monitoring_saved(exits):
    cfg, _, side, stats = exits
    m = stats.monitor["color"]
    full = cfg.optim.iterations + cfg.optim.tail_iterations
    assert (m["samples"], m["early_exits"], m["accepted"]) == (4, 4, 4)
    assert m["iterations_run"] == sum(r["iterations"] for r in side) and m["iterations_full"] == 4 * full
    assert m["seconds_without"] > m["seconds"] - m["monitor_seconds"]


def test_accept_until_target_refills_as_samples_finish(tiny_cfg, generator_models, vqa_models, tmp_path):
    """Thresholds no tiny score reaches: nothing exits, nothing is accepted, each prompt tries its M attempts,
    queued one by one as its earlier attempts finish (target 1, M 3)."""
    cfg = _cfg(tiny_cfg)
    cfg.filter.thresholds = {"color": 1.0}
    cfg.job.target_accepted, cfg.job.max_samples_per_prompt = 1, 3
    side, stats = _process(cfg, generator_models, vqa_models, tmp_path)
    assert sorted((r["prompt_id"], r["sample_index"]) for r in side) == sorted(
        (pid, k) for pid in {r["prompt_id"] for r in side} for k in range(3))
    assert {r["exit_reason"] for r in side} == {"completed"} and not any(r["status"] == "accepted" for r in side)
    assert [s["short_by"] for s in stats.short] == [1, 1]


_KILLED = """
import os, signal, sys
from tests.pipeline.test_process_shard_monitor import _cfg, _rows
from pipeline.config_loading import from_dict
from pipeline.io.shards import ShardSpec
from pipeline.io.storage import filesystem_for
from pipeline.models.loading import load_generator_models, load_vqa_models
from pipeline.process_shard import ShardProcessor
import json
cfg = from_dict(json.loads(sys.argv[1]))
fs, root = filesystem_for(sys.argv[2])
proc = ShardProcessor(cfg, load_generator_models(cfg), load_vqa_models(cfg), {"vqa": "tiny"})
proc.process(ShardSpec(0, _rows(cfg)), fs, root, progress=lambda counts: os.kill(os.getpid(), signal.SIGKILL))
"""


def test_a_shard_killed_mid_way_resumes_to_the_same_records(exits, generator_models, vqa_models, tmp_path):
    cfg, _, side, _ = exits
    out = tmp_path / "killed"
    (out / "shards").mkdir(parents=True)
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-c", _KILLED, json.dumps(cfg.to_dict()), str(out)], env=env,
                         capture_output=True, text=True, timeout=600, cwd=root)
    assert run.returncode == -9, run.stderr[-2000:]  # killed after its first finished sample
    assert not os.path.exists(shard_paths(str(out), 0)["stats"])
    resumed, _ = _process(cfg, generator_models, vqa_models, out)
    assert _comparable(resumed) == _comparable(side)
