"""What the engine tests feed the engine: a tiny config with changes, and requests over a few color prompts."""

from __future__ import annotations

import copy

from pipeline.engine.invert import SampleRequest
from tests.conftest import compbench_prompts

PROMPTS = compbench_prompts("color_val", 3)


def with_changes(base, **changes):
    """A copy of ``base`` with ``section__key=value`` changes."""
    cfg = copy.deepcopy(base)
    for name, value in changes.items():
        section, key = name.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


def color_requests(n: int = 3, seed0: int = 100) -> list[SampleRequest]:
    """``n`` requests cycling over PROMPTS, seeds ``seed0``, ``seed0 + 1``, ..."""
    return [SampleRequest(PROMPTS[i % len(PROMPTS)], f"p{i}", 0, seed0 + i) for i in range(n)]
