"""The referee zoo end to end: tiny.yaml + zoo.yaml through synthesize.py, sidecars, tars and the report."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.referees.detector import UNPARSED
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

PROMPTS = [
    ("a dog on the left of a cat", "spatial"),
    ("a red book and a blue cup", "color"),
    ("a bird near a chair", "spatial"),
    ("a dog and a cat", "spatial"),  # a spatial-category prompt without a relation: the detector skips it
]


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory, tiny_cache, shared_ray) -> Path:
    tmp = tmp_path_factory.mktemp("zoo-run")
    pq.write_table(pa.table({"prompt": [p for p, _ in PROMPTS], "category": [c for _, c in PROMPTS]}),
                   tmp / "p.parquet")
    env = dict(os.environ, REFEREE_SYNTH_CACHE=str(tiny_cache), HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               **shared_ray)
    args = ["--prompts", str(tmp / "p.parquet"), "--output", str(tmp / "run"), "--config", "configs/tiny.yaml",
            "--config", "configs/zoo.yaml", "--no-progress", "--num-actors", "1", "--shard-size", "4",
            "--set", "optim.iterations=2", "--set", "optim.tail_iterations=1", "--set", "optim.warmup=1",
            "--set", "optim.ema_restarts=[1]", "--threshold", "0.0",
            # BLIP-VQA judges every sample here (its random p(yes) is never 0): this test is about the zoo,
            # and the spatial rule zeroes scores under 0.5, which would reject samples the tar checks need.
            "--set", "scoring.by_category={}"]
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "synthesize.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


def _sidecar(run: Path) -> list[dict]:
    rows = pq.read_table(run / "shards" / "000000.parquet").to_pylist()
    return sorted(rows, key=lambda r: r["key"])


def test_every_row_has_one_score_per_active_referee(zoo_run) -> None:
    rows = _sidecar(zoo_run)
    assert [r["prompt"] for r in rows] == [p for p, _ in PROMPTS] and all(r["status"] == "accepted" for r in rows)
    for r in rows:
        scores, skipped = dict(r["referee_scores"]), dict(r["referee_skipped"])
        assert {"blip2", "clip"} <= set(scores) and set(scores) | set(skipped) == {"blip2", "clip", "detector"}
        assert all(e["kind"] == name and 0.0 <= e["score"] <= 1.0 for name, e in scores.items())
        assert scores["blip2"]["score"] == pytest.approx(r["itm_score"])
        assert scores["clip"]["weight"] == 0.5
    by_prompt = {r["prompt"]: r for r in rows}
    # spatial prompts get the detector, others do not; an unparsable spatial prompt is recorded, not an error
    assert "detector" in dict(by_prompt["a dog on the left of a cat"]["referee_scores"])
    assert "detector" in dict(by_prompt["a bird near a chair"]["referee_scores"])
    colour_skip = dict(by_prompt["a red book and a blue cup"]["referee_skipped"])
    assert colour_skip == {"detector": "category 'color' not in its categories ['spatial']"}
    assert dict(by_prompt["a dog and a cat"]["referee_skipped"]) == {"detector": UNPARSED}
    run = json.loads((zoo_run / "run.json").read_text())
    assert run["model_ids"]["referee:detector"].endswith("/detector")
    assert [s["kind"] for s in run["config"]["zoo"]["referees"]] == ["blip2", "clip", "detector"]


def test_the_tar_metadata_carries_the_same_scores(zoo_run) -> None:
    rows = {r["key"]: r for r in _sidecar(zoo_run)}
    with tarfile.open(zoo_run / "shards" / "000000.tar") as tar:
        metas = [json.load(io.BytesIO(tar.extractfile(m).read())) for m in tar if m.name.endswith(".json")]
    assert len(metas) == len(PROMPTS)
    for meta in metas:
        assert meta["referee_scores"] == {k: dict(v) for k, v in rows[meta["key"]]["referee_scores"]}


def test_the_report_shows_referees_per_category(zoo_run) -> None:
    from jobs.report import build_report, referee_rates

    page = build_report(str(zoo_run), 2).read_text()
    assert "Referees per category" in page
    rates = {(r["category"], r["referee"]): r for r in referee_rates(_sidecar(zoo_run))}
    assert rates[("spatial", "detector")]["judged"] == 2 and rates[("spatial", "detector")]["skipped"] == 1
    assert rates[("color", "detector")]["judged"] == 0 and rates[("color", "detector")]["mean_score"] is None
    assert rates[("color", "clip")]["judged"] == 1


def test_the_run_still_loads_with_datasets(zoo_run, tmp_path, monkeypatch) -> None:
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    ds = datasets.load_dataset(str(zoo_run), split="train", cache_dir=str(tmp_path / "hf-cache"))
    rows = {r["key"]: r for r in _sidecar(zoo_run)}
    assert len(ds) == len(PROMPTS)
    for row in ds:
        want = dict(rows[row["__key__"]]["referee_scores"])
        got = {k: v for k, v in row["json"]["referee_scores"].items() if v is not None}
        # datasets' Json feature round-trips floats through ujson at about 10 significant digits.
        assert set(got) == set(want) and got["blip2"]["score"] == pytest.approx(want["blip2"]["score"], rel=1e-9)
