"""Accept or reject a scored sample as GORS does: ``score > threshold``, strictly, in float32.

GORS (T2I-CompBench ``GORS_finetune/train_dataset.py``) keeps a sample when its reward, a float32
tensor read from the 4-decimal string, is strictly greater than the threshold; a score equal to
the threshold is rejected. ``filter.thresholds`` maps category names (T2I-CompBench's: color,
shape, texture, spatial, non_spatial, complex) to thresholds; ``{category}_template`` keys apply
to the benchmark's template prompts (the first 560 lines of a category's train file, which
``jobs/prompts.py`` marks in the ``template`` column). Anything else, or no category, uses
``filter.default_threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import FilterConfig

TEMPLATE_SUFFIX = "_template"


def threshold_for(category: str | None, fcfg: FilterConfig, template: bool = False) -> float:
    """The threshold a sample of ``category`` must exceed (the job records it per sample)."""
    if category and template and category + TEMPLATE_SUFFIX in fcfg.thresholds:
        return fcfg.thresholds[category + TEMPLATE_SUFFIX]
    if category and category in fcfg.thresholds:
        return fcfg.thresholds[category]
    return fcfg.default_threshold


def passes(score: float, threshold: float) -> bool:
    """GORS's ``reward > threshold`` with a float32 reward (the threshold is cast to it by torch)."""
    return bool(np.float32(score) > np.float32(threshold))


def accept(score: float, category: str | None, fcfg: FilterConfig, template: bool = False) -> bool:
    return passes(score, threshold_for(category, fcfg, template))


@dataclass(frozen=True)
class Decision:
    accepted: bool
    threshold: float


def decide(
    score: float, category: str | None, fcfg: FilterConfig, template: bool = False, scorable: bool = True
) -> Decision:
    """Accept/reject together with the threshold used. ``scorable``: the prompt had a question to
    ask; an unscorable prompt's 1.0 is accepted only with ``filter.accept_unscorable``."""
    threshold = threshold_for(category, fcfg, template)
    accepted = passes(score, threshold) and (scorable or fcfg.accept_unscorable)
    return Decision(accepted=accepted, threshold=threshold)
