"""engine.generator cascade through one shard (tiny models, no Ray), its config rules and hash, and what loads."""

from __future__ import annotations

import copy

import pyarrow.parquet as pq
import pytest

from jobs.prompts import prompt_table
from pipeline.config import ConfigError, prompt_attempt_limit, stage_generators
from pipeline.config_loading import load_config, preset_path
from pipeline.engine.invert import INJECT_NAN_ENV
from pipeline.io.compbench_data import COMPBENCH_DIR
from pipeline.io.shards import ShardSpec, shard_paths
from pipeline.io.storage import filesystem_for
from pipeline.process_shard import ShardProcessor
from schemas.prompts import validate_rows

STAGES = "cascade.stages=[{generator: sd_sampling, max_samples: 3}, {generator: inversion, max_samples: 2}]"


def _cascade(cfg):
    cfg = copy.deepcopy(cfg)
    over = load_config(None, ["engine.generator=cascade", STAGES, "job.target_accepted=2"])
    cfg.engine.generator, cfg.cascade, cfg.job.target_accepted = "cascade", over.cascade, 2
    cfg.sampling.steps = 10  # > the tiny inversion's 8 iterations: a NaN at step 9 hits sampling only
    cfg.filter.thresholds = {"color": 0.0, "shape": 1.0}
    return cfg


def test_cascade_shard_stages_per_prompt(tiny_cfg, generator_models, vqa_models, tmp_path, monkeypatch) -> None:
    """color (threshold 0): met by sampling, no inversion. shape (threshold 1): every budget spent. The color
    prompt whose sampling always fails (NaN at step 9, which inversion never reaches): inverts exactly 2."""
    cfg = _cascade(tiny_cfg)
    table = prompt_table([COMPBENCH_DIR / "color_val.txt", COMPBENCH_DIR / "shape_val.txt"], limit=2)
    rows = validate_rows([table], 1, 1000, 128)
    by_cat = {}
    for r in rows:
        by_cat.setdefault(r.category, []).append(r.prompt_id)
    failing = by_cat["color"][1]
    monkeypatch.setenv(INJECT_NAN_ENV, f"{failing}:9")
    fs, root = filesystem_for(str(tmp_path))
    fs.create_dir(f"{root}/shards", recursive=True)
    proc = ShardProcessor(cfg, generator_models, vqa_models, {"vqa": "tiny"})
    assert [s.generator for s in proc.stages] == ["sd_sampling", "inversion"]
    assert proc.stages[0].engine.pipe.unet is proc.stages[1].engine.models.unet  # SD parts loaded once
    stats = proc.process(ShardSpec(0, rows), fs, root)
    side = pq.read_table(shard_paths(root, 0)["parquet"]).to_pylist()
    made = {}
    for r in sorted(side, key=lambda r: (r["row"], r["sample_index"])):
        made.setdefault(r["prompt_id"], []).append((r["sample_index"], r["generator"], r["stage"], r["status"]))
    good = by_cat["color"][0]
    assert made[good] == [(0, "sd_sampling", 1, "accepted"), (1, "sd_sampling", 1, "accepted")]
    assert made[failing] == [(k, "sd_sampling", 1, "failed") for k in range(3)] + [
        (3, "inversion", 2, "accepted"), (4, "inversion", 2, "accepted")]
    for pid in by_cat["shape"]:
        assert made[pid] == [(k, "sd_sampling", 1, "rejected") for k in range(3)] + [
            (k, "inversion", 2, "rejected") for k in (3, 4)]
    assert all(r["itm_score"] is None for r in side if r["generator"] == "sd_sampling")
    assert all(r["itm_score"] is not None for r in side if r["generator"] == "inversion" and r["status"] != "failed")
    assert len({r["key"] for r in side}) == len(side) == 17
    assert {r["config_hash"] for r in side} == {cfg.hash()}
    assert stats.accepted == 4 and len(stats.short) == 2


def test_cascade_config_rules_and_hash() -> None:
    base = ["engine.generator=cascade", STAGES, "job.target_accepted=2"]
    cfg = load_config(preset_path("paper"), base)
    assert stage_generators(cfg) == {"sd_sampling", "inversion"} and prompt_attempt_limit(cfg) == 5
    paper = load_config(preset_path("paper"))
    # Not a cascade: the section leaves the hash alone (every preset keeps its hash).
    assert paper.hash() == load_config(preset_path("paper"), ["job.target_accepted=0"]).hash()
    assert "cascade" not in _hashed(paper) and "cascade" in _hashed(cfg)
    # A cascade's hash holds its stages and both generators' sections.
    assert cfg.hash() != load_config(preset_path("paper"), [*base[:1], STAGES.replace("3", "4"), base[2]]).hash()
    assert cfg.hash() != load_config(preset_path("paper"), [*base, "sampling.steps=10"]).hash()
    assert cfg.hash() != load_config(preset_path("paper"), [*base, "optim.iterations=10"]).hash()
    only_sd = ["engine.generator=cascade", "cascade.stages=[{generator: sd_sampling, max_samples: 3}]",
               "job.target_accepted=1"]
    sd = load_config(preset_path("paper"), only_sd)
    assert sd.hash() == load_config(preset_path("paper"), [*only_sd, "optim.iterations=10"]).hash()
    bad = {
        "needs cascade.stages": ["engine.generator=cascade", "job.target_accepted=1"],
        "cascade.stages needs engine.generator cascade": [STAGES],
        r"stages\[1\] repeats the generator sd_sampling": [
            "engine.generator=cascade", "job.target_accepted=1",
            "cascade.stages=[{generator: sd_sampling}, {generator: sd_sampling}]"],
        r"stages\[0\].generator must be one of inversion, sd_sampling, got ''": [
            "engine.generator=cascade", "job.target_accepted=1", "cascade.stages=[{max_samples: 2}]"],
        "needs job.target_accepted > 0": ["engine.generator=cascade", STAGES],
        "must be <= the cascade's attempts per prompt": ["engine.generator=cascade", STAGES, "job.target_accepted=6"],
        r"max_samples must be >= 1": ["engine.generator=cascade", "job.target_accepted=1",
                                      "cascade.stages=[{generator: inversion, max_samples: 0}]"],
        "sum to 100": ["engine.generator=cascade", "job.target_accepted=1",
                       "cascade.stages=[{generator: inversion, max_samples: 50}, "
                       "{generator: sd_sampling, max_samples: 50}]"],
        "monitor.enabled needs engine.generator inversion": [*base, "monitor.enabled=true"],
        "sampling.lora needs engine.generator sd_sampling": [*base, "sampling.lora=/x"],
    }
    for needle, sets in bad.items():
        with pytest.raises(ConfigError, match=needle):
            load_config(preset_path("paper"), sets)


def _hashed(cfg) -> dict:
    """The data Config.hash() hashes (the same steps, read back through the function under test)."""
    import json
    from unittest import mock

    seen = {}
    real = json.dumps

    def spy(data, **kw):
        seen.update(data)
        return real(data, **kw)

    with mock.patch("pipeline.config.json.dumps", side_effect=spy):
        cfg.hash()
    return seen


def test_a_sampling_only_cascade_loads_no_referee(tiny_cfg) -> None:
    from pipeline.models.loading import load_generator_models

    cfg = copy.deepcopy(tiny_cfg)
    cfg.engine.generator = "cascade"
    cfg.cascade = load_config(None, ["engine.generator=cascade", "job.target_accepted=1",
                                     "cascade.stages=[{generator: sd_sampling, max_samples: 2}]"]).cascade
    gen = load_generator_models(cfg)
    assert gen.referee is None and gen.unet is not None
