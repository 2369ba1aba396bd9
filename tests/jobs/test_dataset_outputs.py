"""What users read from a run folder: `shards/*.tar` holds accepted samples only, rejected images are in
`rejected/`, `shards.txt` lists the complete shards, and `datasets.load_dataset(RUN_DIR)` (the real
Hugging Face library, through the README.md dataset card) loads the accepted pairs of complete shards only."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from tests.conftest import compbench_prompts
from tests.jobs.test_synthesize import _env, _prompts, _run, _sidecars

pytestmark = pytest.mark.slow


def _keys(tar_path: Path) -> set[str]:
    with tarfile.open(tar_path) as tar:
        return {n.split(".")[0] for n in tar.getnames()}


def test_run_folder_loads_with_datasets_accepted_of_complete_shards_only(tmp_path, tiny_cache, shared_ray,
                                                                         monkeypatch) -> None:
    prompts = compbench_prompts("color_val", 3) + compbench_prompts("shape_val", 3)
    path = _prompts(tmp_path / "p.parquet", prompts, category=["color", "shape"] * 3)
    out = tmp_path / "run"
    # Shard 1's marker can never be written: it stays incomplete (tar and sidecar present, no marker).
    args = ["--prompts", str(path), "--output", str(out), "--num-actors", "2", "--shard-size", "2",
            "--set", "filter.thresholds={color: 0.0, shape: 1.0}", "--set", "job.max_shard_retries=0",
            "--set", "job.publish_attempts=2"]
    proc = _run(args, _env(tiny_cache, **shared_ray, REFEREE_SYNTH_REFUSE_WRITES="000001.stats.json"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "write refused" in proc.stderr and "gave up after 2 tries" in proc.stderr  # retried, then failed
    side = {r["key"]: r for r in _sidecars(out)}
    accepted = {k for k, r in side.items() if r["status"] == "accepted"}
    rejected = {k for k, r in side.items() if r["status"] == "rejected"}
    assert accepted and rejected

    # Every tar a `shards/*.tar` glob finds holds accepted samples only; rejected ones are apart.
    globbed = set().union(*(_keys(p) for p in (out / "shards").glob("*.tar")))
    assert globbed <= accepted and rejected == set().union(*(_keys(p) for p in (out / "rejected").glob("*.tar")))

    complete = sorted(int(p.name[:6]) for p in (out / "shards").glob("*.stats.json"))
    assert complete == [0, 2]
    lines = (out / "shards.txt").read_text().splitlines()
    assert lines == [str(out / "shards" / f"{s:06d}.tar") for s in complete]  # not contiguous: no brace line
    want = {k for k in accepted if int(k[:6]) in complete}

    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert sorted(ds["__key__"]) == sorted(want)
    for row in ds:
        meta = side[row["__key__"]]
        assert row["txt"] == meta["prompt"] and row["json"]["vqa_score"] == meta["vqa_score"]
        assert row["png"].size == (64, 64)
    run = json.loads((out / "run.json").read_text())
    assert {"torch", "transformers", "diffusers", "kornia", "spacy", "spacy_model", "ray"} <= set(run["libraries"])
