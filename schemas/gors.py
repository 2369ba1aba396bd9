"""The reward file GORS reads, and the rule it selects with: one contract for every reader and writer.

T2I-CompBench's scorers write ``vqa_result.json`` as ``[{"question_id": i, "answer": A}]``. BLIP-VQA
writes A as a 4-decimal string (``'{:.4f}'``); CLIPScore, the 2D-spatial rule and 3-in-1 write the raw
float. GORS (``GORS_finetune/train_dataset.py``) reads A into a float32 tensor and keeps the image when
it is strictly greater than the threshold, itself compared in float32. The filter, ``score.py``, the
GORS export and ``finetune_stream`` all go through ``reward_answer`` and ``selects``, so a sample is
accepted by us exactly when GORS would select it from our export.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# The one scorer whose answers the benchmark rounds (pipeline.scoring.routing.BLIP_VQA: a test keeps
# the two names equal; schemas/ sits below pipeline/ and cannot import it).
ROUNDED_SCORER = "blip_vqa"
ANSWER_DIGITS = 4  # '{:.4f}' in BLIPvqa_eval/BLIP_vqa.py


def reward_answer(scorer: str | None, score: float, digits: int = ANSWER_DIGITS) -> str | float:
    """A score as the benchmark's reward file holds it: BLIP-VQA's rounded string, the others' raw float.

    ``scorer`` None is a record from before the ``scorer`` field (schema 3 and older): BLIP-VQA."""
    if scorer in (None, ROUNDED_SCORER):
        return f"{score:.{digits}f}"
    return float(score)


def selects(answer: Any, threshold: float) -> bool:
    """GORS's ``reward > threshold``: the answer (string or number) as float32, strictly greater."""
    return bool(np.float32(float(answer)) > np.float32(threshold))
