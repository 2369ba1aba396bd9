"""The cascade's expectations and ``cascade.stages: auto``'s choice against an independent computation: every
accept/reject sequence enumerated with its probability and run through the stopping rule attempt by attempt."""

from __future__ import annotations

import itertools
import json

import pytest

from pipeline.budget.cascade_plan import StageRates, choose_auto, choose_first_budget, expect
from pipeline.config_loading import load_config
from schemas.prompts import PromptRow


def _brute(k: int, stages: list[StageRates], budgets: list[int]) -> tuple[float, float, list[float]]:
    """(expected seconds, expected accepted, expected attempts per stage) over all 2^n outcome sequences."""
    kinds = [s for s, b in zip(stages, budgets) for _ in range(b)]
    seconds = accepted = 0.0
    per_stage = [0.0] * len(stages)
    index = [i for i, b in enumerate(budgets) for _ in range(b)]
    for outcome in itertools.product((False, True), repeat=len(kinds)):
        prob = 1.0
        for s, ok in zip(kinds, outcome):
            prob *= s.acceptance_rate if ok else 1 - s.acceptance_rate
        got = 0
        for j, (s, ok) in enumerate(zip(kinds, outcome)):
            if got >= k:  # the refill makes no attempt once the target is met
                break
            seconds += prob * s.seconds_per_sample
            per_stage[index[j]] += prob
            got += ok
        accepted += prob * got
    return seconds, accepted, per_stage


SD, INV = "sd_sampling", "inversion"


@pytest.mark.parametrize("k,p1,p2,budgets", [(2, 0.3, 0.7, [3, 2]), (3, 0.05, 0.5, [4, 3]), (1, 0.9, 0.2, [2, 2]),
                                             (2, 0.0, 1.0, [3, 2]), (3, 0.5, 0.5, [0, 4])])
def test_expect_equals_the_enumeration(k, p1, p2, budgets) -> None:
    stages = [StageRates(SD, p1, 1.5), StageRates(INV, p2, 170.0)]
    e = expect(k, stages, budgets)
    seconds, accepted, per_stage = _brute(k, stages, budgets)
    assert e.seconds == pytest.approx(seconds, rel=1e-9, abs=1e-12)
    assert sum(e.accepted) == pytest.approx(accepted, rel=1e-9, abs=1e-12)
    assert e.attempts == pytest.approx(per_stage, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("p1,p2", [(0.02, 0.6), (0.3, 0.6), (0.005, 0.9), (0.0, 0.5), (0.6, 0.6)])
def test_auto_choice_is_the_enumerated_optimum(p1, p2) -> None:
    k, most = 2, [6, 3]
    stages = [StageRates(SD, p1, 2.0), StageRates(INV, p2, 118 * 2.0)]
    best, values = choose_first_budget(k, stages, most)
    brute = {}
    for b in range(most[0] + 1):
        seconds, accepted, _ = _brute(k, stages, [b, most[1]])
        brute[b] = seconds / accepted
    expected = min(brute, key=lambda b: (round(brute[b], 9), b))
    assert best == expected
    assert all(values[b] == pytest.approx(v, rel=1e-9) for b, v in brute.items())


def _rates(per: dict[str, tuple[float, float]]) -> dict:
    first = next(iter(per.values()))
    return {"source": {"kind": "run", "run": "r", "runs": ["r"]}, "per_category": per, "overall": first}


def test_choose_auto_per_category_from_measured_rates() -> None:
    cfg = load_config(None, ["engine.generator=cascade", "cascade.stages=auto", "job.target_accepted=2",
                             "job.max_samples_per_prompt=4"])
    assert cfg.cascade.auto and [(s.generator, s.max_samples) for s in cfg.cascade.stages] == [(SD, 4), (INV, 4)]
    rows = [PromptRow(row=i, prompt=f"p{i}", prompt_id=str(i), category=c, seed=None, num_samples=1)
            for i, c in enumerate(["color", "spatial", "color"])]
    by_generator = {SD: _rates({"color": (0.5, 2.0), "spatial": (0.001, 2.0)}),
                    INV: _rates({"color": (0.6, 240.0), "spatial": (0.4, 240.0)})}
    chosen = choose_auto(cfg, rows, by_generator)
    assert chosen == {"color": 4, "spatial": 0}  # sampling pays for color; for spatial every sample is waste
    for name, (p1, s1), (p2, s2) in (("color", (0.5, 2.0), (0.6, 240.0)), ("spatial", (0.001, 2.0), (0.4, 240.0))):
        stages = [StageRates(SD, p1, s1), StageRates(INV, p2, s2)]
        brute = {b: (lambda t: t[0] / t[1])(_brute(2, stages, [b, 4])) for b in range(5)}
        assert chosen[name] == min(brute, key=lambda b: (round(brute[b], 9), b))


def _fake_run(folder, generator: str, cats: dict, gens: dict | None = None) -> str:
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"config": {"engine": {"generator": generator}}}))
    summary = {"categories": cats}
    if gens is not None:
        summary["generators"] = gens
    (folder / "summary.json").write_text(json.dumps(summary))
    return str(folder)


def test_plan_prints_the_choice_and_writes_the_formula_inputs(tmp_path, capsys) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs import synthesize

    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a red cube", "a cat left of a dog", "a blue ball"],
                             "category": ["color", "spatial", "color"]}), prompts)
    sd = _fake_run(tmp_path / "sd", SD, {"color": {"samples": 100, "accepted": 50, "seconds": 200.0},
                                        "spatial": {"samples": 100, "accepted": 0, "seconds": 200.0}})
    # A cascade run counts for each of its generators with the samples each made.
    inv = _fake_run(tmp_path / "cas", "cascade", {"color": {"samples": 1, "accepted": 1, "seconds": 1.0}},
                    {INV: {"categories": {"color": {"samples": 10, "accepted": 6, "seconds": 2400.0},
                                          "spatial": {"samples": 10, "accepted": 4, "seconds": 2400.0}}}})
    out = tmp_path / "plan"
    code = synthesize.main(["--plan", "--prompts", str(prompts), "--output", str(out), "--generator", "cascade",
                            "--set", "cascade.stages=auto", "--target-accepted", "2", "--max-samples", "4",
                            "--from-run", sd, "--from-run", inv])
    assert code == 0
    text = capsys.readouterr().out
    assert "auto's stage-1 budgets: {color: 4, spatial: 0}" in text and "cascade total:" in text
    plan = json.loads((out / "plan.json").read_text())
    c = plan["cascade"]
    assert c["first_stage_by_category"] == {"color": 4, "spatial": 0}
    assert c["categories"]["color"]["inputs"]["stages"] == [
        {"generator": SD, "acceptance_rate": 0.5, "seconds_per_sample": 2.0, "max_samples": 4},
        {"generator": INV, "acceptance_rate": 0.6, "seconds_per_sample": 240.0, "max_samples": 4}]
    e = expect(2, [StageRates(SD, 0.5, 2.0), StageRates(INV, 0.6, 240.0)], [4, 4])
    assert c["categories"]["color"]["gpu_hours"] == pytest.approx(2 * e.seconds / 3600, rel=1e-4)
    assert plan["gpu_hours"] == pytest.approx(c["gpu_hours"], rel=1e-3)
    assert c["categories"]["spatial"]["stages"][0]["expected_samples"] == 0  # never sampled
    assert c["mix"][INV]["share"] + c["mix"][SD]["share"] == pytest.approx(1.0, abs=1e-3)


def test_a_run_with_auto_records_the_choice_the_plan_prints(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs import synthesize
    from pipeline.config import cascade_budgets
    from pipeline.config_loading import from_dict

    prompts = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a red cube", "a cat left of a dog"], "category": ["color", "spatial"]}),
                   prompts)
    sd = _fake_run(tmp_path / "sd", SD, {"color": {"samples": 100, "accepted": 50, "seconds": 200.0},
                                        "spatial": {"samples": 100, "accepted": 0, "seconds": 200.0}})
    inv = _fake_run(tmp_path / "inv", INV, {"color": {"samples": 10, "accepted": 6, "seconds": 2400.0},
                                           "spatial": {"samples": 10, "accepted": 4, "seconds": 2400.0}})
    args = synthesize.build_parser().parse_args([
        "--prompts", str(prompts), "--output", str(tmp_path / "run"), "--generator", "cascade",
        "--set", "cascade.stages=auto", "--target-accepted", "2", "--max-samples", "4", "--from-run", sd,
        "--from-run", inv])
    cfg = synthesize.config_from_args(args)
    before = cfg.hash()
    synthesize._choose_auto_stages(args, cfg)
    assert cfg.cascade.first_stage_by_category == {"color": 4, "spatial": 0}
    assert cfg.hash() != before  # the choice is part of what the run makes
    again = from_dict(cfg.to_dict())  # what the actors rebuild
    assert again.hash() == cfg.hash()
    assert cascade_budgets(again, "spatial") == [0, 4] and cascade_budgets(again, "color") == [4, 4]
    assert cascade_budgets(again, "texture") == [4, 4]  # a category the choice did not see: stage 1's maximum
