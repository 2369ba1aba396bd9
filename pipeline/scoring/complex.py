"""T2I-CompBench's 3-in-1 score for complex prompts (``3_in_1_eval/3_in_1.py``).

The benchmark scores every complex image three times, each scorer in its complex mode: BLIP-VQA
(the attribute score, the 4-decimal answer), the 2D-spatial rule (``--complex``: objects around
its prepositions) and CLIPScore (``--complex``: the prompt without adjectives, the "action" score).
Then, per prompt, by the lists it ships (``complex_val_spatial.txt``, ``complex_val_action.txt``;
a prompt is compared lower-cased, up to its first '.'):

- in the spatial list: (spatial + attribute) x 0.5
- else in the action list: (action + attribute) x 0.5
- otherwise: (attribute + spatial + action) / 3

This module uses the train and val lists both (they are built the same way), so a train prompt is
classified as its val sibling would be. The average is exact; the spatial part runs on the OWLv2
substitute (pipeline/scoring/spatial.py), so a 3-in-1 score is labelled approximate.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from pipeline.io.compbench_data import COMPBENCH_DIR
from pipeline.scoring.routing import BLIP_VQA, CLIPSCORE, SPATIAL

SPATIAL_KIND, ACTION_KIND, BOTH_KIND = "spatial", "action", "spatialaction"
_SPLITS = ("val", "train")


def prompt_key(prompt: str) -> str:
    """How 3_in_1.py compares prompts: the text before the first '.', lower-cased."""
    return prompt.strip("\n").split(".")[0].lower()


@lru_cache(maxsize=4)
def _lists(folder: str) -> tuple[frozenset[str], frozenset[str]]:
    def read(kind: str) -> frozenset[str]:
        keys: set[str] = set()
        for split in _SPLITS:
            path = Path(folder) / f"complex_{split}_{kind}.txt"
            if path.is_file():
                keys.update(prompt_key(line) for line in path.read_text(encoding="utf-8").splitlines())
        return frozenset(keys)

    return read(SPATIAL_KIND), read(ACTION_KIND)


def prompt_kind(prompt: str, folder: Path = COMPBENCH_DIR) -> str:
    """Which of the benchmark's three averages applies to ``prompt``."""
    spatial, action = _lists(str(folder))
    key = prompt_key(prompt)
    if key in spatial:
        return SPATIAL_KIND
    if key in action:
        return ACTION_KIND
    return BOTH_KIND


def three_in_one(kind: str, attribute: float, spatial: float, action: float) -> float:
    """The benchmark's weighted mean (float64, as its numpy arrays)."""
    a, s, c = np.float64(attribute), np.float64(spatial), np.float64(action)
    if kind == SPATIAL_KIND:
        return float((s + a) * 0.5)
    if kind == ACTION_KIND:
        return float((c + a) * 0.5)
    return float((a + s + c) / 3)


def combine_parts(prompt: str, parts: dict[str, float], folder: Path = COMPBENCH_DIR) -> tuple[str, float]:
    """(kind, score) from the three scorers' results keyed by scorer name."""
    kind = prompt_kind(prompt, folder)
    return kind, three_in_one(kind, parts[BLIP_VQA], parts[SPATIAL], parts[CLIPSCORE])
