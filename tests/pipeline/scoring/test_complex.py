"""3-in-1: which average applies to a complex prompt, and the averages themselves."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.io.compbench_data import COMPBENCH_DIR
from pipeline.scoring.complex import (
    ACTION_KIND,
    BOTH_KIND,
    SPATIAL_KIND,
    combine_parts,
    prompt_key,
    prompt_kind,
    three_in_one,
)
from pipeline.scoring.routing import BLIP_VQA, CLIPSCORE, SPATIAL, THREE_IN_ONE


def _first(name: str) -> str:
    return (COMPBENCH_DIR / f"{name}.txt").read_text().splitlines()[0]


def test_averages_by_kind() -> None:
    a, s, c = 0.6, 0.3, 0.31
    assert three_in_one(SPATIAL_KIND, a, s, c) == pytest.approx((s + a) * 0.5)
    assert three_in_one(ACTION_KIND, a, s, c) == pytest.approx((c + a) * 0.5)
    assert three_in_one(BOTH_KIND, a, s, c) == pytest.approx((a + s + c) / 3)


def test_kind_comes_from_the_shipped_lists() -> None:
    assert prompt_kind(_first("complex_val_spatial")) == SPATIAL_KIND
    assert prompt_kind(_first("complex_val_action")) == ACTION_KIND
    assert prompt_kind(_first("complex_val_spatialaction")) == BOTH_KIND  # the benchmark's "else"
    assert prompt_kind("a prompt in no list") == BOTH_KIND
    # compared as the benchmark does: up to the first '.', lower-cased
    assert prompt_kind(_first("complex_val_spatial").upper()) == SPATIAL_KIND
    assert prompt_key("The cat sat. Then it left") == "the cat sat"


def test_every_complex_val_prompt_gets_a_kind() -> None:
    kinds = [prompt_kind(p) for p in (COMPBENCH_DIR / "complex_val.txt").read_text().splitlines() if p.strip()]
    assert kinds.count(SPATIAL_KIND) >= 50 and kinds.count(ACTION_KIND) >= 200 and kinds.count(BOTH_KIND) >= 25


def test_scorer_set_averages_its_three_parts(tiny_cfg) -> None:
    from pipeline.scoring.scorers import ScorerSet

    image = Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8))
    prompt = _first("complex_val_action")
    judged = ScorerSet(tiny_cfg).judge(image, prompt, "complex")
    assert judged.scorer == THREE_IN_ONE and set(judged.parts) == {BLIP_VQA, SPATIAL, CLIPSCORE}
    assert judged.score == combine_parts(prompt, judged.parts)[1]
    assert judged.score == pytest.approx((judged.parts[CLIPSCORE] + judged.parts[BLIP_VQA]) / 2)
    assert judged.questions  # the attribute part's BLIP-VQA questions are kept
