"""Device time per category, the run totals, and the plan's expectations (no models)."""

from __future__ import annotations

import pytest

from jobs.report_target import attempts_per_prompt, target_section
from pipeline.budget.accounting import run_accounting
from pipeline.budget.run_plan import expected_accepted, expected_attempts, short_probability
from schemas.run import ShardStats


def _stats(shard: int, categories: dict, short: list) -> ShardStats:
    return ShardStats(shard=shard, rows=0, samples=0, accepted=0, rejected=0, failed=0, invalid_input=0,
                      seconds=0.0, config_hash="h", tar_bytes=0, parquet_bytes=0, finished_at="",
                      categories=categories, short=short)


def test_run_accounting_adds_shards_and_derives_rates_and_cost() -> None:
    a = _stats(0, {"color": {"prompts": 2, "samples": 4, "accepted": 2, "rejected": 2, "failed": 0, "seconds": 8.0}},
               [{"prompt_id": "p1", "category": "color", "row": 1, "accepted": 1, "tried": 4, "short_by": 1}])
    b = _stats(1, {"color": {"prompts": 1, "samples": 2, "accepted": 2, "rejected": 0, "failed": 0, "seconds": 4.0},
                   "shape": {"prompts": 1, "samples": 4, "accepted": 0, "rejected": 4, "failed": 0, "seconds": 12.0}},
               [{"prompt_id": "p3", "category": "shape", "row": 3, "accepted": 0, "tried": 4, "short_by": 2}])
    acc = run_accounting([a, b], price=3.6, target=2, max_samples=4)
    assert acc["device_seconds"] == 24.0 and acc["seconds_per_accepted"] == 6.0
    assert acc["cost_per_accepted"] == pytest.approx(0.006)
    color, shape = acc["categories"]["color"], acc["categories"]["shape"]
    assert (color["prompts"], color["samples"], color["accepted"]) == (3, 6, 4)
    assert color["acceptance_rate"] == pytest.approx(4 / 6, abs=1e-4) and color["seconds_per_accepted"] == 3.0
    assert shape["acceptance_rate"] == 0.0 and shape["seconds_per_accepted"] is None
    assert acc["short_prompts_total"] == 2 and [i["prompt_id"] for i in acc["short_prompts"]["shape"]] == ["p3"]


def test_expected_attempts_and_shortfall() -> None:
    assert expected_attempts(1.0, 2, 5) == 2 and expected_accepted(1.0, 2, 5) == 2
    assert expected_attempts(0.0, 2, 5) == 5 and short_probability(0.0, 2, 5) == 1
    assert expected_attempts(0.5, 2, 5) == pytest.approx(3.5625)
    assert short_probability(0.5, 2, 5) == pytest.approx(6 / 32)
    assert expected_accepted(0.5, 2, 5) == pytest.approx(2 - 2 * 1 / 32 - 5 / 32)


def test_report_section_has_the_table_charts_and_short_prompts(tmp_path) -> None:
    recs = [{"prompt_id": "a", "category": "color", "status": "accepted", "seconds": 2.0},
            {"prompt_id": "a", "category": "color", "status": "accepted", "seconds": 2.0},
            {"prompt_id": "b", "category": "shape", "status": "rejected", "seconds": 3.0},
            {"prompt_id": "c", "category": None, "status": "invalid_input", "seconds": 0.0}]
    summary = {"target_accepted": 2, "seconds_per_accepted": 3.5, "gpu_hour_price": 1.0,
               "short_prompts": {"shape": [{"prompt_id": "b", "category": "shape", "accepted": 0, "tried": 1,
                                            "short_by": 2}]}}
    page = target_section(recs, summary, tmp_path)
    assert attempts_per_prompt(recs) == {2: 1, 1: 1}
    assert "<td>color</td><td>1</td><td>2</td><td>2</td><td>100.0%</td><td>2.00</td>" in page
    assert "Prompts short of the target (2)" in page and "<td>b</td>" in page
    assert (tmp_path / "categories.png").stat().st_size > 0 and (tmp_path / "attempts.png").is_file()
