"""--plan with earlier runs of both generators: grouped by the generator each run recorded, compared."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.synthesize import main
from pipeline.budget.run_plan import expected_attempts, rates_by_generator


def _earlier(folder: Path, generator: str | None, cats: dict) -> str:
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"categories": cats}))
    engine = {} if generator is None else {"generator": generator}  # None: a run made before the choice
    (folder / "run.json").write_text(json.dumps({"config": {"engine": engine}}))
    return str(folder)


@pytest.fixture
def runs(tmp_path) -> dict[str, str]:
    inv = {"color": {"samples": 10, "accepted": 8, "seconds": 60.0}, "shape": {"samples": 10, "accepted": 5,
                                                                              "seconds": 60.0}}
    sd = {"color": {"samples": 20, "accepted": 8, "seconds": 2.0}, "shape": {"samples": 20, "accepted": 2,
                                                                            "seconds": 2.0}}
    sd_more = {"color": {"samples": 20, "accepted": 8, "seconds": 2.0}}
    return {"inversion": _earlier(tmp_path / "inv", None, inv), "sd": _earlier(tmp_path / "sd", "sd_sampling", sd),
            "sd_more": _earlier(tmp_path / "sd2", "sd_sampling", sd_more)}


def test_runs_are_grouped_by_their_generator_and_pooled(runs) -> None:
    by = rates_by_generator([runs["inversion"], runs["sd"], runs["sd_more"]])
    assert set(by) == {"inversion", "sd_sampling"}
    assert by["inversion"]["per_category"]["color"] == (0.8, 6.0)
    assert by["sd_sampling"]["per_category"]["color"] == (16 / 40, 4.0 / 40)  # two runs pooled
    assert by["sd_sampling"]["source"]["runs"] == [runs["sd"], runs["sd_more"]]


def test_plan_compares_the_generators_gpu_hours_for_the_same_target(runs, tmp_path, capsys) -> None:
    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a red cube", "a blue ball", "a round bowl"],
                             "category": ["color", "color", "shape"]}), prompts)
    out = tmp_path / "plan"
    args = ["--plan", "--prompts", str(prompts), "--output", str(out), "--config", "configs/paper.yaml",
            "--target-accepted", "2", "--max-samples", "8", "--from-run", runs["inversion"], "--from-run", runs["sd"]]
    assert main(args) == 0
    plan = json.loads((out / "plan.json").read_text())
    gens = plan["generators"]
    assert set(gens) == {"inversion", "sd_sampling"}
    # color: 2 prompts, p = 0.8 at 6 s (inversion) and p = 0.4 at 0.1 s (sampling); shape: 1 prompt.
    assert gens["inversion"]["categories"]["color"]["gpu_hours"] == pytest.approx(
        2 * expected_attempts(0.8, 2, 8) * 6.0 / 3600, abs=1e-4)
    assert gens["sd_sampling"]["categories"]["color"]["gpu_hours"] == pytest.approx(
        2 * expected_attempts(0.4, 2, 8) * 0.1 / 3600, abs=1e-4)
    assert gens["sd_sampling"]["gpu_hours"] < gens["inversion"]["gpu_hours"]
    # The plan itself is the config's generator's (inversion: paper.yaml).
    assert plan["gpu_hours"] == gens["inversion"]["gpu_hours"] and plan["source"]["runs"] == [runs["inversion"]]
    text = capsys.readouterr().out
    assert "generators, same prompts and target" in text and "cheapest for this target: sd_sampling" in text

    assert main([*args, "--generator", "sd_sampling"]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["source"]["runs"] == [runs["sd"]]
    assert plan["gpu_hours"] == plan["generators"]["sd_sampling"]["gpu_hours"]


def test_plan_for_a_generator_without_an_earlier_run_uses_its_floor(runs, tmp_path) -> None:
    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a red cube"], "category": ["color"]}), prompts)
    out = tmp_path / "plan"
    assert main(["--plan", "--prompts", str(prompts), "--output", str(out), "--config", "configs/sd15.yaml",
                 "--from-run", runs["inversion"]]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["source"]["kind"] == "flop_floor" and plan["source"]["flops_per_image"] < 1e14  # sampling's floor
    assert set(plan["generators"]) == {"inversion"}
