"""benchmarks/compare_generators.py --cascade on the tiny set: the cascade beside each generator alone, judged by
the benchmark's scorer stub; with rates 0 and 1 the plan's attempts per generator are exact, so the prediction
is checked on counts here (its seconds against the measured ones are the benchmark's own report)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

RATES = {"color": {"sd_sampling": 1.0, "inversion": 1.0}, "shape": {"sd_sampling": 0.0, "inversion": 1.0}}


def test_cascade_beside_each_generator_with_the_plans_prediction(tiny_cache) -> None:
    args = ["benchmarks/compare_generators.py", "--json", "--cascade", "sd_sampling:3,inversion:2", "--target", "2",
            "--categories", "color", "shape", "--prompts-per-category", "1", "--reps", "1",
            "--set", "sampling.steps=4", "--stub-rates", json.dumps(RATES)]
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, REFEREE_SYNTH_CACHE=str(tiny_cache), HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    runs = result["runs"]
    assert set(runs) == {"sd_sampling", "inversion", "cascade"}
    # Alone, with target 2 and at most 5 attempts: sampling never makes a shape image, inversion always does.
    assert (runs["sd_sampling"]["shape"]["samples"], runs["sd_sampling"]["shape"]["accepted"]) == (5, 0)
    assert (runs["inversion"]["shape"]["samples"], runs["inversion"]["shape"]["accepted"]) == (2, 2)
    # The cascade: color met by sampling (2 samples); shape 3 failed samplings then 2 inversions.
    assert (runs["cascade"]["color"]["samples"], runs["cascade"]["color"]["accepted"]) == (2, 2)
    assert (runs["cascade"]["shape"]["samples"], runs["cascade"]["shape"]["accepted"]) == (5, 2)
    assert result["cascade_samples_by_generator"] == {"sd_sampling": 5, "inversion": 2}
    assert result["planned_samples_by_generator"] == pytest.approx({"sd_sampling": 5.0, "inversion": 2.0})
    # The prediction is the plan's formula on the generators' own measured seconds per sample.
    s_sd = runs["sd_sampling"]["shape"]["seconds_per_image"]
    s_inv = runs["inversion"]["shape"]["seconds_per_image"]
    shape = result["prediction"]["shape"]
    assert shape["predicted_seconds_per_accepted"] == pytest.approx((3 * s_sd + 2 * s_inv) / 2, rel=1e-3, abs=1e-3)
    assert shape["measured_seconds_per_accepted"] == pytest.approx(runs["cascade"]["shape"]["seconds_per_accepted"])
    assert set(result["prediction"]) == {"color", "shape", "(all)"}
    assert all(c["relative_error"] is not None for c in result["prediction"].values())
