"""GORS's own selection, re-implemented from the facts of its code, on our export = our accepted set.

For every scorer, a run folder of one category (GORS trains one category at a time) holds samples whose
scores sit on both sides of the GORS preset's thresholds. The run's filter decides them; the export writes
them all (``--include-rejected``); an independent GORS reader (files sorted by the integer after the
first ``_``, rewards matched by position, a prompt's threshold by its first index in dataset.txt, template
when < 560, kept when float32(answer) > threshold) must keep exactly the samples the run accepted.
Each image is a solid grey whose level is the sample's number, so a kept file is traced to its sample by
its pixels, not by the export's order.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jobs import export_gors
from pipeline.config_loading import load_config, preset_path
from pipeline.io.compbench_data import COMPBENCH_DIR
from pipeline.io.shards import ShardWriter, encode_image
from pipeline.io.storage import filesystem_for
from pipeline.scoring.filter import decide
from schemas.samples import SampleRecord, sample_key

# GORS_finetune/train_dataset.py's thresholds as (template, natural), edited per category by its users;
# non_spatial on the raw cosine (0.75 / 2.5), the reading configs/gors.yaml records as inferred.
GORS_TAU = {"color": (0.92, 0.7), "shape": (0.85, 0.6), "texture": (0.9, 0.65), "spatial": (0.8, 0.8),
            "non_spatial": (0.3, 0.3), "complex": (0.4, 0.4)}
TEMPLATE_LINES = 560
SCORER = {"color": "blip_vqa", "shape": "blip_vqa", "texture": "blip_vqa", "spatial": "spatial_detector",
          "non_spatial": "clipscore", "complex": "three_in_one"}


def _planted(tau: float) -> list[float]:
    """Scores on both sides of tau: at it, a float32 step around it, 3e-5 above (lost if rounded), 0.92."""
    return [tau, tau + 3e-5, tau - 1e-7, float(np.nextafter(np.float32(tau), np.float32(2))), tau + 1e-8,
            round(tau - 1e-4, 4), 0.92, min(1.0, tau + 0.05)]


def _cases(category: str) -> list[tuple[int, float]]:
    """(line in the train list, score): planted scores on template lines, and on natural ones where the
    category has them (its natural threshold differs)."""
    template_tau, natural_tau = GORS_TAU[category]
    cases = [(i, s) for i, s in enumerate(_planted(template_tau))]
    if natural_tau != template_tau:
        cases += [(TEMPLATE_LINES + i, s) for i, s in enumerate(_planted(natural_tau))]
    return cases


def _write_run(out: Path, category: str) -> dict[int, bool]:
    """One shard; sample n's image is grey level n. Returns n -> accepted by the run's own filter."""
    cfg = load_config(preset_path("gors"))
    lines = (COMPBENCH_DIR / f"{category}_train.txt").read_text().splitlines()
    fs, root = filesystem_for(str(out))
    writer = ShardWriter(fs, root, 0, "png", keep_rejected=True)
    accepted: dict[int, bool] = {}
    for n, (line, score) in enumerate(_cases(category)):
        template = line < TEMPLATE_LINES
        scorer = SCORER[category]
        # BLIP-VQA's image score is stored rounded to 4 decimals, as the scorer computes it.
        stored = round(score, 4) if scorer == "blip_vqa" else score
        decision = decide(stored, category, cfg.filter, template, scorer=scorer)
        accepted[n] = decision.accepted
        rec = SampleRecord(key=sample_key(0, n, 0), shard=0, row=n, prompt_id=str(n), prompt=lines[line],
                           category=category, sample_index=0, seed=n,
                           status="accepted" if decision.accepted else "rejected", vqa_score=stored,
                           threshold=decision.threshold, scorer=scorer, benchmark_index=line, template=template)
        writer.add(rec, encode_image(torch.full((3, 8, 8), n / 255), "png"))
    writer.finish(rows=len(accepted), seconds=0.0, config_hash=cfg.hash())
    (out / "run.json").write_text(json.dumps({"config": cfg.to_dict(), "config_hash": cfg.hash()}))
    return accepted


def _gors_selects(folder: Path, category: str) -> list[int]:
    """GORS's reader and filter, from the facts of train_dataset.py; returns the kept images' grey levels."""
    files = sorted((folder / "samples").glob("*.png"), key=lambda p: int(p.stem.split("_")[1]))
    rewards = json.loads((folder / "reward" / "vqa_result.json").read_text())
    prompts = [line.split("\t")[0] for line in (folder / "dataset.txt").read_text().splitlines()]
    template_tau, natural_tau = GORS_TAU[category]
    kept = []
    for path, reward in zip(files, rewards, strict=True):
        prompt = path.stem.split("_")[0]
        if prompt not in prompts:
            continue
        tau = template_tau if prompts.index(prompt) < TEMPLATE_LINES else natural_tau
        if np.float32(float(reward["answer"])) > np.float32(tau):
            pixels = np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("L"))
            kept.append(int(pixels[0, 0]))
    return sorted(kept)


@pytest.mark.parametrize("category", sorted(GORS_TAU))
def test_gors_selects_exactly_what_the_run_accepted(tmp_path: Path, category: str) -> None:
    accepted = _write_run(tmp_path / "run", category)
    assert any(accepted.values()) and not all(accepted.values())  # the planted scores split both ways
    out = tmp_path / "gors"
    assert export_gors.main(["--run", str(tmp_path / "run"), "--output", str(out), "--include-rejected"]) == 0
    assert _gors_selects(out, category) == sorted(n for n, ok in accepted.items() if ok)


@pytest.mark.parametrize(("category", "kind"), [("color", str), ("spatial", float), ("non_spatial", float),
                                                ("complex", float)])
def test_each_scorer_is_exported_in_the_benchmarks_format(tmp_path: Path, category: str, kind: type) -> None:
    _write_run(tmp_path / "run", category)
    assert export_gors.main(["--run", str(tmp_path / "run"), "--output", str(tmp_path / "gors")]) == 0
    answers = [r["answer"] for r in json.loads((tmp_path / "gors" / "reward" / "vqa_result.json").read_text())]
    assert answers and all(type(a) is kind for a in answers)
    if kind is str:
        assert all(len(a.split(".")[1]) == 4 for a in answers)
    else:  # raw: a score 3e-5 above the threshold is written as it is, not as "0.8000"
        tau = GORS_TAU[category][0]
        assert tau + 3e-5 in answers
