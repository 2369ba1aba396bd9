"""What users do with a run: GORS export, the HTML report (in headless Chromium), the evaluation."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import COMPBENCH, ROOT, compbench_prompts

pytestmark = pytest.mark.slow
UNDERSCORE_PROMPT = "a red_cube and a blue ball"


def _env(tiny_cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, REFEREE_SYNTH_CACHE=str(tiny_cache), HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    return {**env, **extra}


def _job(script: str, args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_cache, shared_ray) -> Path:
    """20 shared prompts (10 color accepted, 10 shape rejected) plus one prompt holding '_'."""
    tmp = tmp_path_factory.mktemp("run-outputs")
    prompts = compbench_prompts("color_val", 10) + compbench_prompts("shape_val", 10) + [UNDERSCORE_PROMPT]
    cats = ["color"] * 10 + ["shape"] * 10 + ["color"]
    pq.write_table(pa.table({"prompt": prompts, "category": cats}), tmp / "p.parquet")
    proc = _job("synthesize.py", ["--prompts", str(tmp / "p.parquet"), "--output", str(tmp / "run"),
                                  "--config", "configs/tiny.yaml", "--no-progress", "--num-actors", "1",
                                  "--set", "filter.thresholds={color: 0.0, shape: 1.0}"],
                _env(tiny_cache, **shared_ray))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


def _sidecars(run: Path) -> list[dict]:
    rows = []
    for f in sorted((run / "shards").glob("*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return sorted(rows, key=lambda r: r["key"])


def _gors_load(folder: Path) -> list[tuple[str, int, str]]:
    """What a GORS-style loader does: files sorted by the integer after the last '_', prompt before the first."""
    files = sorted((folder / "samples").glob("*.png"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    rewards = json.loads((folder / "reward" / "vqa_result.json").read_text())
    assert len(files) == len(rewards)
    return [(f.stem.split("_")[0], int(f.stem.rsplit("_", 1)[1]), r["answer"]) for f, r in zip(files, rewards)]


def test_gors_export_layout_order_and_rewards(tiny_run, tiny_cache, tmp_path) -> None:
    out = tmp_path / "gors"
    proc = _job("export_gors.py", ["--run", str(tiny_run), "--output", str(out)], _env(tiny_cache))
    assert proc.returncode == 0, proc.stderr
    accepted = [r for r in _sidecars(tiny_run) if r["status"] == "accepted" and r["prompt"] != UNDERSCORE_PROMPT]
    loaded = _gors_load(out)
    assert [idx for _, idx, _ in loaded] == list(range(len(accepted))) and len(accepted) == 10
    assert [p for p, _, _ in loaded] == [r["prompt"] for r in accepted]
    assert [a for _, _, a in loaded] == [f"{r['vqa_score']:.4f}" for r in accepted]
    assert all(re.fullmatch(r"0\.\d{4}|1\.0000", a) for _, _, a in loaded)
    assert (out / "dataset.txt").read_text().splitlines() == [r["prompt"] for r in accepted]
    assert all(f.name.endswith(f"_{i:06d}.png") for i, f in enumerate(sorted((out / "samples").glob("*.png"),
               key=lambda p: int(p.stem.rsplit("_", 1)[1]))))
    # The prompt holding '_' is reported and skipped, never written under a wrong name.
    assert f"prompt {UNDERSCORE_PROMPT!r}" in proc.stderr
    assert not any("red" in f.name and "cube" in f.name for f in (out / "samples").iterdir())


def test_score_py_reproduces_every_stored_score_string(tiny_run, tiny_cache, tmp_path) -> None:
    """Synthesis scores the stored PNG as the benchmark would: score.py on the run agrees to the digit."""
    out = tmp_path / "rescore"
    proc = _job("score.py", ["--shards", str(tiny_run), "--output", str(out), "--config", "configs/tiny.yaml"],
                _env(tiny_cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    accepted = {r["key"]: r for r in _sidecars(tiny_run) if r["status"] == "accepted"}
    lines = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    answers = [r["answer"] for r in json.loads((out / "vqa_result.json").read_text())]
    assert [x["key"] for x in lines] == sorted(accepted) and len(lines) == 11
    assert answers == [f"{accepted[x['key']]['vqa_score']:.4f}" for x in lines]
    assert all(x["answers"] == accepted[x["key"]]["vqa_answers"] for x in lines)


def test_gors_export_maps_unsafe_prompts_when_asked(tiny_run, tiny_cache, tmp_path) -> None:
    out = tmp_path / "gors"
    proc = _job("export_gors.py", ["--run", str(tiny_run), "--output", str(out), "--map-unsafe",
                                   "--include-rejected"], _env(tiny_cache))
    assert proc.returncode == 0, proc.stderr
    loaded = _gors_load(out)
    assert len(loaded) == 21  # accepted and rejected, all with stored images
    assert "a red cube and a blue ball" in [p for p, _, _ in loaded]
    mapped = [json.loads(line) for line in (out / "mapped_prompts.jsonl").read_text().splitlines()]
    assert mapped[0]["prompt"] == UNDERSCORE_PROMPT and mapped[0]["written_as"] == "a red cube and a blue ball"


def test_finetune_stream_reads_accepted_pairs(tiny_run) -> None:
    from pipeline.io.reader import finetune_stream

    items = list(finetune_stream(str(tiny_run)))
    assert len(items) == 11
    image, caption, score = items[0]
    assert image.shape == (3, 64, 64) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert isinstance(caption, str) and 0.0 <= score <= 1.0


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_chromium_with_every_image(tiny_run, tiny_cache) -> None:
    proc = _job("report.py", ["--run", str(tiny_run)], _env(tiny_cache))
    assert proc.returncode == 0, proc.stderr
    page = tiny_run / "report" / "index.html"
    text = page.read_text()
    for needle in ("Totals", "acceptance rate", "VQA scores per category", "Accepted samples",
                   "Rejected samples", "Questions that fail most", "a green bench?"):
        assert needle in text
    browser = _chromium()
    assert browser, "chromium is needed for this test (.ci/run installs the Debian package)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=browser, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        tab = b.new_page()
        tab.goto(page.as_uri(), wait_until="load")
        script = "Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
        images = tab.evaluate(script)
        b.close()
    # Two histograms (color, shape), 21 thumbnails (11 accepted, 10 rejected), the per-category bars
    # and the attempts-per-prompt chart.
    assert len(images) == 25
    assert "Acceptance and device time per category" in text and "Attempts per prompt" in text
    broken = [src for src, complete, width in images if not complete or width == 0]
    assert broken == []


def test_evaluate_prints_table_for_two_categories(tiny_cache, shared_ray, tmp_path) -> None:
    out = tmp_path / "eval"
    proc = _job("evaluate.py", ["--prompts-dir", str(COMPBENCH), "--category", "color", "--category", "shape",
                                "--limit", "2", "--images-per-prompt", "2", "--config", "configs/tiny.yaml",
                                "--output", str(out), "--no-progress", "--num-actors", "1"],
                _env(tiny_cache, **shared_ray))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| Model | Color | Shape | Texture | Spatial | Non-spatial | Complex |" in proc.stdout
    assert "| paper: our method (Table 3) | 0.8162 | 0.6209 | 0.7202 | 0.1506 | 0.3215 | 0.3529 |" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["categories"]["color"]["images"] == 4 and results["categories"]["shape"]["images"] == 4
    seeds = sorted(r["seed"] for r in _sidecars(out / "run") if r["category"] == "color")
    assert seeds == [42, 42, 43, 43]  # T2I-CompBench's seeds 42.. per prompt
    header = (out / "results.md").read_text().splitlines()[0]
    assert header.startswith("BLIP-VQA scorer: approximate;") and "tiny random-weight" in header
    assert results["scorer"]["exact"] is False and results["scorer"]["spacy_version"]
