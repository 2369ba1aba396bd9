"""What users read from a run folder: `shards/*.tar` holds accepted samples only, rejected images are in
`rejected/`, `shards.txt` lists the complete shards, and `datasets.load_dataset(RUN_DIR)` (the real
Hugging Face library, through the README.md dataset card) loads the accepted pairs of complete shards only,
whatever mix of categories (and so of scorers) the shards hold."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from tests.conftest import compbench_prompts
from tests.jobs.test_synthesize import _env, _prompts, _run, _sidecars

pytestmark = pytest.mark.slow


def _same(got, want) -> bool:
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(_same(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(_same(g, w) for g, w in zip(got, want))
    if isinstance(want, float):
        return got == pytest.approx(want, rel=1e-9)
    return got == want


def _keys(tar_path: Path) -> set[str]:
    with tarfile.open(tar_path) as tar:
        return {n.split(".")[0] for n in tar.getnames()}


# All six T2I-CompBench categories, one val prompt each, in shards of 2. The first complete shard holds the
# spatial and non_spatial samples (no VQA answers: an empty list; their scorers' own score_parts keys) and a
# later one texture and complex (VQA answers, three_in_one's parts): a reader that infers the columns from
# the first shard fails or drops values unless every field has one type and the card declares them.
CATEGORIES = ["spatial", "non_spatial", "color", "shape", "texture", "complex"]


def test_run_folder_loads_with_datasets_accepted_of_complete_shards_only(tmp_path, tiny_cache, shared_ray,
                                                                         monkeypatch) -> None:
    prompts = [compbench_prompts(f"{c}_val", 1)[0] for c in CATEGORIES]
    path = _prompts(tmp_path / "p.parquet", prompts, category=CATEGORIES)
    out = tmp_path / "run"
    # Shard 1's marker can never be written: it stays incomplete (tar and sidecar present, no marker).
    thresholds = "{" + ", ".join(f"{c}: {1.0 if c == 'shape' else 0.0}" for c in CATEGORIES) + "}"
    args = ["--prompts", str(path), "--output", str(out), "--shard-size", "2",
            "--set", f"filter.thresholds={thresholds}", "--set", "job.max_shard_retries=0",
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
    assert {side[k]["category"] for k in want} == {"spatial", "non_spatial", "texture", "complex"}
    stored = {}
    for tar in (out / "shards").glob("*.tar"):
        with tarfile.open(tar) as t:
            stored.update({m.name[:-5]: json.loads(t.extractfile(m).read()) for m in t if m.name.endswith(".json")})
    for row in ds:
        meta = side[row["__key__"]]
        assert row["txt"] == meta["prompt"] and row["json"]["vqa_score"] == meta["vqa_score"]
        assert row["png"].size == (64, 64)
        # Every field comes back as KEY.json holds it (objects through `datasets`' Json: ~10 digits).
        assert _same(row["json"], stored[row["__key__"]]), row["__key__"]
    run = json.loads((out / "run.json").read_text())
    assert {"torch", "transformers", "diffusers", "kornia", "spacy", "spacy_model", "ray"} <= set(run["libraries"])
