"""benchmarks/compare_generators.py --json on the tiny set: both generators, per category, FLOPs from flops.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_json_reports_both_generators_per_category(tiny_cache) -> None:
    args = ["benchmarks/compare_generators.py", "--json", "--categories", "color", "shape", "--prompts-per-category",
            "1", "--samples-per-prompt", "2", "--reps", "1", "--set", "sampling.steps=4",
            "--set", "filter.thresholds={color: 0.0, shape: 1.0}"]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, REFEREE_SYNTH_CACHE=str(tiny_cache), HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["models"] == "tiny" and result["sampling"]["steps"] == 4
    from benchmarks.flops import count
    from pipeline.config_loading import load_config, preset_path

    for name, g in result["generators"].items():
        assert set(g["categories"]) == {"color", "shape"}
        color, shape = g["categories"]["color"], g["categories"]["shape"]
        assert color["samples"] == shape["samples"] == 2
        assert (color["acceptance_rate"], shape["acceptance_rate"]) == (1.0, 0.0)  # the thresholds decide
        assert color["seconds_per_image"] > 0 and color["seconds_per_accepted"] == color["seconds_per_image"]
        assert shape["seconds_per_accepted"] is None
        # flops.py's count for this config: real model widths at its image size (64 px) and schedule
        cfg = load_config(preset_path("tiny"), [f"engine.generator={name}", "sampling.steps=4"])
        assert g["flops_per_image"] == count(cfg)["total_flops"] == color["flops_per_image"]
    inv, sd = result["generators"]["inversion"], result["generators"]["sd_sampling"]
    assert inv["flops_per_image"] > sd["flops_per_image"]
    cmp = result["comparison"]["color"]
    assert cmp["flops_ratio"] == pytest.approx(inv["flops_per_image"] / sd["flops_per_image"])
    assert cmp["seconds_per_accepted_ratio"] > 0 and result["comparison"]["shape"]["seconds_per_accepted_ratio"] is None
