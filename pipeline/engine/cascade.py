"""The engines of a run: one per generator (``engine.generator``), or one per stage of a cascade.

A cascade's stages share one ``GeneratorModels`` (the SD 1.5 parts are loaded once; the referee only when a
stage inverts, ``pipeline.models.loading``). Each stage's engine runs with its own batch size
(``cascade.stages[i].batch_size``, 0: ``engine.batch_size``); which attempts go to which stage, and when,
is ``pipeline.budget.refill``'s.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from pipeline.config import CASCADE, Config
from pipeline.models.loading import GeneratorModels


@dataclass
class Stage:
    generator: str  # inversion | sd_sampling
    max_samples: int  # attempts per prompt at most (0: the run's own rule, no cascade)
    batch_size: int
    engine: Any  # InversionEngine | SamplingEngine: ``run(requests) -> results``


def make_engine(gen: GeneratorModels, cfg: Config, generator: str) -> Any:
    """The named generator's engine; both have ``run(requests) -> results``."""
    if generator == "sd_sampling":
        from pipeline.engine.sample_sd import SamplingEngine

        return SamplingEngine(gen, cfg)
    from pipeline.engine.invert import InversionEngine

    return InversionEngine(gen, cfg)


def make_stages(gen: GeneratorModels, cfg: Config) -> list[Stage]:
    """The run's stages in order: a single generator is one stage."""
    if cfg.engine.generator != CASCADE:
        return [Stage(cfg.engine.generator, 0, cfg.engine.batch_size, make_engine(gen, cfg, cfg.engine.generator))]
    stages = []
    for spec in cfg.cascade.stages:
        size = spec.batch_size or cfg.engine.batch_size
        stage_cfg = copy.deepcopy(cfg)
        stage_cfg.engine.batch_size = size  # the engine cuts its requests by this: one batch per call
        stages.append(Stage(spec.generator, spec.max_samples, size, make_engine(gen, stage_cfg, spec.generator)))
    return stages
