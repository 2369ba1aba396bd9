"""One shard without Ray (tiny models): the stored image is what gets scored, GORS's selection rule."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.prompts import prompt_table
from jobs.score import score_samples, shard_samples
from pipeline.io.compbench_data import COMPBENCH_DIR
from pipeline.io.shards import ShardSpec, shard_paths
from pipeline.io.storage import filesystem_for
from pipeline.process_shard import ShardProcessor
from pipeline.scoring.vqa import format_score
from schemas.prompts import validate_rows

# Lines 558-561 of color_train.txt: two template prompts, then two natural ones.
FIRST, COUNT = 558, 4


def _rows(cfg):
    table = prompt_table([COMPBENCH_DIR / "color_train.txt"]).slice(FIRST, COUNT)
    return validate_rows([table], 2, cfg.job.max_prompt_chars, cfg.job.max_prompt_id_chars)


def _cfg(base, **filter_fields):
    cfg = copy.deepcopy(base)
    cfg.job.samples_per_prompt = 2
    for key, value in filter_fields.items():
        setattr(cfg.filter, key, value)
    return cfg


def _process(cfg, generator_models, vqa_models, out) -> list[dict]:
    fs, root = filesystem_for(str(out))
    fs.create_dir(f"{root}/shards", recursive=True)
    processor = ShardProcessor(cfg, generator_models, vqa_models, {"vqa": "tiny"})
    processor.process(ShardSpec(0, _rows(cfg)), fs, root)
    (Path(root) / "run.json").write_text(json.dumps({"config_hash": cfg.hash()}))  # as the driver writes it
    return pq.read_table(shard_paths(root, 0)["parquet"]).to_pylist()


@pytest.fixture(scope="module")
def gors_run(tiny_cfg, generator_models, vqa_models, tmp_path_factory):
    thresholds = {"color": 0.0, "color_template": 0.0}  # every score > 0 is kept: all images land in the tar
    cfg = _cfg(tiny_cfg, thresholds=thresholds)
    out = tmp_path_factory.mktemp("shard-run")
    return cfg, out, _process(cfg, generator_models, vqa_models, out)


def test_template_flags_come_from_the_benchmark_position(gors_run):
    _, _, side = gors_run
    assert [(r["benchmark_index"], r["template"]) for r in side[::2]] == [
        (558, True), (559, True), (560, False), (561, False)]


def test_stored_scores_are_what_score_py_finds_in_the_tar(gors_run, vqa_models):
    """The score recorded at synthesis is the benchmark's score of the stored PNG, to the digit."""
    from pipeline.scoring.vqa import VqaScorer

    cfg, out, side = gors_run
    accepted = {r["key"]: r for r in side if r["status"] == "accepted"}
    assert len(accepted) == 2 * COUNT
    records = list(score_samples(shard_samples(out), VqaScorer(vqa_models, cfg), cfg))
    assert [r["key"] for r in records] == sorted(accepted)
    for rec in records:
        stored = accepted[rec["key"]]
        assert format_score(rec["score"], 4) == format_score(stored["vqa_score"], 4)
        assert rec["answers"] == stored["vqa_answers"] and rec["template"] == stored["template"]


def test_template_thresholds_and_a_score_equal_to_the_threshold_is_rejected(
    gors_run, tiny_cfg, generator_models, vqa_models, tmp_path
):
    _, _, side = gors_run
    natural_score = side[4]["vqa_score"]  # line 560's first sample
    template_score = side[0]["vqa_score"]  # line 558's first sample
    cfg = _cfg(tiny_cfg, thresholds={"color": natural_score, "color_template": template_score})
    again = _process(cfg, generator_models, vqa_models, tmp_path / "again")
    assert [r["vqa_score"] for r in again] == [r["vqa_score"] for r in side]  # same images, same scores
    for r in again:
        assert r["threshold"] == (template_score if r["template"] else natural_score)
        assert (r["status"] == "accepted") == (r["vqa_score"] > r["threshold"])
    assert again[0]["status"] == "rejected" and again[4]["status"] == "rejected"  # equal: rejected


def test_each_category_is_judged_by_its_scorer_and_recorded(tiny_cfg, generator_models, tmp_path):
    """A spatial prompt is accepted on the spatial rule, a colour prompt on BLIP-VQA; each record says which."""
    from pipeline.scoring.routing import BLIP_VQA, SPATIAL

    cfg = _cfg(tiny_cfg, thresholds={"color": 0.0, "spatial": 0.0})
    cfg.job.samples_per_prompt = 1
    table = prompt_table([COMPBENCH_DIR / "color_val.txt", COMPBENCH_DIR / "spatial_val.txt"], limit=1)
    rows = validate_rows([table], 2, cfg.job.max_prompt_chars, cfg.job.max_prompt_id_chars)
    fs, root = filesystem_for(str(tmp_path))
    fs.create_dir(f"{root}/shards", recursive=True)
    processor = ShardProcessor(cfg, generator_models, None, {"vqa": "tiny"})  # scorers load on first need
    processor.process(ShardSpec(0, rows), fs, root)
    side = {r["category"]: r for r in pq.read_table(shard_paths(root, 0)["parquet"]).to_pylist()}
    assert side["color"]["scorer"] == BLIP_VQA and side["color"]["vqa_questions"]
    assert side["spatial"]["scorer"] == SPATIAL and side["spatial"]["vqa_questions"] == []
    assert dict(side["spatial"]["score_parts"]) == {SPATIAL: side["spatial"]["vqa_score"]}
    for rec in side.values():  # the filter judged the scorer's own score
        assert (rec["status"] == "accepted") == (rec["vqa_score"] > 0.0)
    assert processor.scorers.loaded() == ["detector", "vqa"]
