"""jobs/evaluate.py over the relation and complex categories (tiny models): all six Table-3 columns, labelled."""

from __future__ import annotations

import json

import pytest

from tests.conftest import COMPBENCH
from tests.jobs.test_run_outputs import _env, _job, _sidecars

SPATIAL_LABEL = "spatial (detector: google/owlv2-base-patch16-ensemble; UniDet vocabulary; approximate)"


def test_evaluate_prints_six_labelled_columns(tiny_cache, shared_ray, tmp_path) -> None:
    out = tmp_path / "eval"
    args = ["--prompts-dir", str(COMPBENCH), "--limit", "1", "--images-per-prompt", "1",
            "--config", "configs/tiny.yaml", "--output", str(out), "--no-progress", "--num-actors", "1"]
    for cat in ("spatial", "non_spatial", "complex"):
        args += ["--category", cat]
    proc = _job("evaluate.py", args, _env(tiny_cache, **shared_ray))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "|  | Attribute binding |  |  | Object relationship |  | Complex |" in lines
    assert "| Model | Color | Shape | Texture | Spatial | Non-spatial | Complex |" in lines
    assert "| paper: our method (Table 3) | 0.8162 | 0.6209 | 0.7202 | 0.1506 | 0.3215 | 0.3529 |" in lines
    ours = next(line for line in lines if line.startswith("| referee-synth |")).split(" | ")
    assert ours[1:4] == ["-", "-", "-"]  # attribute columns not run
    assert all(0.0 <= float(x.strip(" |")) <= 1.0 for x in ours[4:7])
    labels = next(line for line in lines if line.startswith("| scorer |"))
    assert "| BLIP-VQA (approximate) |" in labels and f"| {SPATIAL_LABEL} |" in labels
    assert "| CLIPScore (approximate) |" in labels and "| 3-in-1 (approximate; spatial part on detector" in labels
    assert any(line.startswith(SPATIAL_LABEL + ": deviations:") and "UniDet" in line for line in lines)

    results = json.loads((out / "results.json").read_text())
    cats = results["categories"]
    assert {c: cats[c]["scorer"] for c in cats} == {
        "spatial": "spatial_detector", "non_spatial": "clipscore", "complex": "three_in_one"}
    assert results["labels"]["spatial"] == SPATIAL_LABEL
    side = {r["category"]: r for r in _sidecars(out / "run")}
    assert set(dict(side["complex"]["score_parts"])) == {"blip_vqa", "spatial_detector", "clipscore"}
    assert (out / "results.md").read_text().startswith("BLIP-VQA scorer: approximate;")
    # The benchmark's vocabulary by default, recorded with the run; no open-vocabulary deviation then.
    assert json.loads((out / "run" / "run.json").read_text())["config"]["scoring"]["spatial_vocabulary"] == "unidet"
    assert not any("open vocabulary" in line for line in lines)


def test_unknown_category_names_the_shipped_lists(tiny_cache, tmp_path) -> None:
    proc = _job("evaluate.py", ["--category", "colour", "--output", str(tmp_path / "e"), "--config",
                                "configs/tiny.yaml"], _env(tiny_cache))
    assert proc.returncode == 2 and "colour_val.txt" in proc.stderr and "non_spatial" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_other_categories_get_a_column_saying_they_are_not_the_benchmarks_method() -> None:
    from jobs.evaluate import markdown_table

    scorer = {"by_category": {"color": "blip_vqa", "default": "blip_vqa"},
              "scorers": {"blip_vqa": {"label": "BLIP-VQA (exact)", "deviations": []}}}
    md = markdown_table({"color": {"mean": 0.5}, "numeracy": {"mean": 0.25}}, scorer).splitlines()
    assert "| Model | Color | Shape | Texture | Spatial | Non-spatial | Complex | Numeracy |" in md
    assert "| referee-synth | 0.5000 | - | - | - | - | - | 0.2500 |" in md
    assert md[-1].endswith("| BLIP-VQA (exact) (not the benchmark's method: the benchmark counts UniDet detections "
                           "(UniDet_eval/numeracy_eval.py)) |")


@pytest.mark.parametrize(("extra", "needle"), [
    (["--limit", "0"], "--limit must be at least 1"),
    (["--limit", "-1"], "--limit must be at least 1"),
    (["--images-per-prompt", "0"], "--images-per-prompt must be at least 1"),
])
def test_counts_that_do_not_mean_what_they_say_are_refused(tmp_path, extra, needle) -> None:
    """Issue 33, class 14: --limit 0 meant no limit, -1 dropped the last prompt."""
    from jobs.evaluate import main
    from pipeline.errors import UserError

    with pytest.raises(UserError, match=needle):
        main(["--category", "color", "--output", str(tmp_path / "e"), *extra])
    assert not (tmp_path / "e").exists()


def test_an_output_that_is_a_file_is_one_line(tmp_path) -> None:
    from jobs.evaluate import main
    from pipeline.errors import UserError

    (tmp_path / "e").write_text("")
    with pytest.raises(UserError, match="is a file; give a folder"):
        main(["--category", "color", "--output", str(tmp_path / "e")])


def test_every_config_layer_reaches_the_run(tmp_path, monkeypatch) -> None:
    """Issue 33, class 9: evaluate layers --config as synthesize does (it kept only the last)."""
    from jobs import evaluate, synthesize

    seen: list[list[str]] = []
    monkeypatch.setattr(synthesize, "main", lambda argv: seen.append(argv) or 2)  # stop before any run
    code = evaluate.main(["--category", "color", "--limit", "1", "--output", str(tmp_path / "e"),
                          "--config", "configs/tiny.yaml", "--config", "configs/gors.yaml"])
    assert code == 2
    args = synthesize.build_parser().parse_args(seen[0])
    cfg = synthesize.config_from_args(args)
    assert cfg.models.tiny and cfg.filter.accept_unscorable is False  # both layers


def test_score_layers_every_config_as_synthesize_does() -> None:
    from jobs.score import build_parser
    from pipeline.config_loading import load_config

    args = build_parser().parse_args(["--shards", "r", "--output", "o", "--config", "configs/tiny.yaml",
                                      "--config", "configs/gors.yaml"])
    cfg = load_config(args.config, args.overrides)
    assert cfg.models.tiny and cfg.filter.thresholds["color"] == 0.7
