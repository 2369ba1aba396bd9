"""The report's generator comparison: this run's prompts and target at each generator's earlier rates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.report_target import generators_section
from pipeline.budget.run_plan import expected_attempts


def _run(folder: Path, generator: str, cats: dict, **summary) -> str:
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"categories": cats, **summary}))
    (folder / "run.json").write_text(json.dumps({"config": {"engine": {"generator": generator}}}))
    return str(folder)


def test_section_projects_both_generators_to_this_runs_target(tmp_path) -> None:
    this = _run(tmp_path / "inv", "inversion", {"color": {"prompts": 4, "samples": 8, "accepted": 6, "seconds": 48.0}},
                target_accepted=2, max_samples_per_prompt=6)
    other = _run(tmp_path / "sd", "sd_sampling", {"color": {"prompts": 4, "samples": 24, "accepted": 6,
                                                            "seconds": 2.4}})
    summary = json.loads((Path(this) / "summary.json").read_text())
    page = generators_section(this, [other], summary)
    assert "Generators compared" in page and "inversion: acceptance" in page and "sd_sampling: acceptance" in page
    inv_hours = 4 * expected_attempts(0.75, 2, 6) * 6.0 / 3600
    sd_hours = 4 * expected_attempts(0.25, 2, 6) * 0.1 / 3600
    assert f"{inv_hours:.4f}" in page and f"{sd_hours:.4f}" in page
    assert "75.0%" in page and "25.0%" in page
    assert generators_section(this, [], summary) == ""


def test_without_a_target_it_compares_seconds_per_accepted(tmp_path) -> None:
    this = _run(tmp_path / "inv", "inversion", {"shape": {"prompts": 2, "samples": 4, "accepted": 2, "seconds": 20.0}})
    other = _run(tmp_path / "sd", "sd_sampling", {"shape": {"prompts": 2, "samples": 4, "accepted": 1, "seconds": 1.0}})
    page = generators_section(this, [other], json.loads((Path(this) / "summary.json").read_text()))
    assert "device seconds per accepted image" in page
    assert "<td>10.0000</td>" in page and "<td>1.0000</td>" in page  # 5 s / 0.5 and 0.25 s / 0.25


def test_a_compare_run_without_a_summary_is_one_line(tmp_path) -> None:
    from pipeline.errors import UserError

    this = _run(tmp_path / "inv", "inversion", {"color": {"prompts": 1, "samples": 1, "accepted": 1, "seconds": 1.0}})
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"^--compare-run .*: no summary\.json"):
        generators_section(this, [str(tmp_path / "empty")], {})
