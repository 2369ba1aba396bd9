"""The reward-file contract: each scorer's answer format and GORS's float32 strict selection."""

from __future__ import annotations

import json

import numpy as np
import pytest

from schemas.gors import ROUNDED_SCORER, reward_answer, selects


def test_the_rounded_scorer_is_blip_vqa() -> None:
    from pipeline.config import SCORER_NAMES
    from pipeline.scoring.routing import BLIP_VQA

    assert ROUNDED_SCORER == BLIP_VQA and ROUNDED_SCORER in SCORER_NAMES


@pytest.mark.parametrize(("scorer", "score", "written"), [
    ("blip_vqa", 0.80003, "0.8000"), (None, 0.92, "0.9200"), ("blip_vqa", 1.0, "1.0000"),
    ("clipscore", 0.30001, 0.30001), ("spatial_detector", 0.80003, 0.80003), ("three_in_one", 0.4000001, 0.4000001),
])
def test_answers_are_written_as_the_benchmark_writes_them(scorer, score, written) -> None:
    answer = reward_answer(scorer, score)
    assert answer == written and type(answer) is type(written)
    assert json.loads(json.dumps(answer)) == written  # survives the JSON file unchanged


@pytest.mark.parametrize(("answer", "threshold", "kept"), [
    (0.80003, 0.8, True), ("0.8000", 0.8, False), (0.7999999, 0.8, False), (0.8, 0.8, False),
    (0.80000001, 0.8, False),  # the same float32 as 0.8
    ("0.9200", 0.92, False), ("0.9201", 0.92, True), (0.92, 0.92, False), (0.3000001, 0.3, True),
])
def test_selection_is_strictly_greater_in_float32(answer, threshold, kept) -> None:
    import torch

    assert selects(answer, threshold) is kept
    reward = torch.tensor([float(answer)], dtype=torch.float32)  # GORS's reward tensor
    assert bool(reward[0] > threshold) is kept
    assert bool(np.float32(float(answer)) > np.float32(threshold)) is kept
