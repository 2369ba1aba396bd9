"""--plan with earlier runs of both generators: grouped by the generator each run recorded, compared."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.synthesize import main
from pipeline.budget.run_plan import expected_attempts, rates_by_generator
from pipeline.errors import UserError


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


# ---- issue 33 -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("summary", "needle"), [
    ([1, 2], "no 'categories' mapping"),
    ({"samples": 3}, "no 'categories' mapping"),
    ({"categories": ["color"]}, "no 'categories' mapping"),
    ({"categories": {"color": 5}}, "category 'color' is not a mapping"),
    ({"categories": {"color": {"samples": "10", "accepted": 1, "seconds": 1.0}}}, "for samples"),
    ({"categories": {"color": {"samples": 10, "seconds": 1.0}}}, "for accepted"),
    ({"categories": {"color": {"samples": 10, "accepted": -3, "seconds": 1.0}}}, "for accepted"),
    ({"categories": {"color": {"samples": 10, "accepted": 11, "seconds": 1.0}}}, "more accepted"),
])
def test_a_from_run_summary_of_the_wrong_shape_is_one_line(tmp_path, summary, needle) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "run.json").write_text(json.dumps(["not", "a", "run"]))  # run.json of the wrong shape too
    with pytest.raises(UserError, match=needle) as err:
        rates_by_generator([str(folder)])
    assert str(err.value).startswith(f"--from-run {folder}: summary.json")


def test_a_run_json_of_the_wrong_shape_counts_as_the_default_generator(runs, tmp_path) -> None:
    for text in ('"a string"', '{"config": [1]}', '{"config": {"engine": "x"}}',
                 '{"config": {"engine": {"generator": 5}}}'):
        (Path(runs["sd"]) / "run.json").write_text(text)
        assert set(rates_by_generator([runs["sd"]])) == {"inversion"}


def test_plan_columns_stay_apart_at_a_hundred_thousand_prompts() -> None:
    from pipeline.budget.run_plan import _category_table

    row = {"prompts": 100_000, "acceptance_rate": 0.25, "seconds_per_sample": 1234.5, "expected_samples": 12_345_678.9,
           "expected_accepted": 1_234_567.8, "expected_short_prompts": 99_999.0, "gpu_hours": 123_456.789}
    header, line = _category_table({"color": row})
    cells = line.split()
    assert cells == ["color", "100000", "0.250", "1234.50", "12345678.9", "1234567.8", "99999.0", "123456.789"]
    assert len(header.split()) == len(cells)


def test_a_seed_that_overflows_at_a_refill_index_makes_that_row_invalid(tmp_path) -> None:
    """Class 2: seed + (max_samples - 1) must fit int64, not seed + (num_samples - 1) alone."""
    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a red cube", "a blue ball"], "seed": pa.array([2**63 - 1, 7], pa.int64())}),
                   prompts)
    out = tmp_path / "plan"
    args = ["--plan", "--prompts", str(prompts), "--output", str(out), "--config", "configs/tiny.yaml"]
    assert main(args) == 0
    assert json.loads((out / "plan.json").read_text())["invalid_rows"] == 0  # one sample each: it fits
    assert main([*args, "--target-accepted", "2", "--max-samples", "5"]) == 0
    assert json.loads((out / "plan.json").read_text())["invalid_rows"] == 1


def test_max_samples_without_a_target_is_said_once(tmp_path, capsys) -> None:
    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a red cube"]}), prompts)
    base = ["--plan", "--prompts", str(prompts), "--output", str(tmp_path / "plan"), "--config", "configs/tiny.yaml"]
    assert main([*base, "--max-samples", "5"]) == 0
    assert capsys.readouterr().err.count("--max-samples has no effect without --target-accepted") == 1
    assert main([*base, "--max-samples", "5", "--target-accepted", "2"]) == 0
    assert "no effect" not in capsys.readouterr().err
