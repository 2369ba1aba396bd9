"""The plan's FLOP count against what the engine does: a zoo run with monitoring, counted by FlopCounterMode,
and the plan's multiplicities (pipeline/engine/flop_floor.py) times the same models' per-call FLOPs
(benchmarks/flops.py on meta copies of the loaded models). On the tiny set (built once per test session; the
small set would be built for this test alone): what is checked is the multiplicities, whatever the sizes.
What the plan leaves out (the zoo's text encodings once per prompt, the unconditional SDS text) is ~5% here,
far less at the real sizes, where the vision passes dominate."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.flops import per_call_flops
from benchmarks.real_models import RealModels, ZooRealModels
from jobs.prompts import prompt_table
from pipeline.config_loading import load_config, preset_path
from pipeline.engine.flop_floor import Assumptions, calls_per_image
from pipeline.io.compbench_data import COMPBENCH_DIR
from pipeline.io.shards import ShardSpec
from pipeline.io.storage import filesystem_for
from pipeline.models.loading import load_generator_models
from pipeline.process_shard import ShardProcessor
from schemas.prompts import validate_rows


def _meta(module):
    from benchmarks.flops import on_meta

    return on_meta(module)


def test_the_plan_counts_the_flops_of_a_monitored_zoo_run(tiny_cache: Path, tmp_path: Path) -> None:
    cfg = load_config([preset_path("tiny"), preset_path("zoo")], [
        f"models.tiny_cache_dir={tiny_cache}", "optim.iterations=3", "optim.tail_iterations=1", "optim.warmup=1",
        "optim.ema_restarts=[2]", "augment.num_views=2", "engine.batch_size=2",
        "monitor.enabled=true", "monitor.every=1", "monitor.early_exit=false",
        "filter.default_threshold=0.0"])
    table = prompt_table([COMPBENCH_DIR / "color_val.txt", COMPBENCH_DIR / "spatial_val.txt"], limit=1)
    rows = validate_rows([table], 1, cfg.job.max_prompt_chars, cfg.job.max_prompt_id_chars)
    processor = ShardProcessor(cfg, load_generator_models(cfg), None, {"vqa": "tiny"})
    scorers = processor.scorers
    scorers.prepare({scorers.scorer_name(r.category) for r in rows})  # loads outside the count
    fs, root = filesystem_for(str(tmp_path))
    fs.create_dir(f"{root}/shards", recursive=True)
    with FlopCounterMode(display=False) as counter:
        stats = processor.process(ShardSpec(0, rows), fs, root)
    assert stats.accepted + stats.rejected == 2
    measured = counter.get_total_flops()

    engine, gen = processor.engine, processor.engine.models
    referee_tokens = len(engine.referee.token_ids(rows[0].prompt))
    vqa = scorers.vqa
    questions = vqa.questions([r.prompt for r in rows if r.category == "color"])[0]
    ids = vqa._question_ids(questions)
    a = Assumptions(text_tokens=referee_tokens, questions=len(questions),
                    question_tokens=round(sum(len(i) for i in ids) / len(ids)))
    clip = next(r.model for r in engine.zoo.referees if r.kind == "clip")
    owl = next(r.model for r in engine.zoo.referees if r.kind == "detector")
    models = RealModels(*(_meta(m) for m in (gen.vae, gen.unet, gen.text_encoder, gen.referee, gen.caption_head,
                                              vqa.models.model)))
    zoo = ZooRealModels(_meta(clip), _meta(scorers._scorer("clip").clip.model), _meta(owl))
    per_call = per_call_flops(models, zoo, cfg, a)
    planned = sum(per_call[name] * n for r in rows for name, n in calls_per_image(cfg, a, r.category).items())
    assert planned == pytest.approx(measured, rel=0.10), (planned, measured)
