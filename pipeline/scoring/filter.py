"""Accept or reject a scored sample as GORS does: ``score > threshold``, strictly, in float32.

GORS (T2I-CompBench ``GORS_finetune/train_dataset.py``) keeps a sample when its reward, a float32
read from the benchmark's reward file, is strictly greater than the threshold; a score equal to
the threshold is rejected. The value compared is the one the benchmark writes (``schemas.gors``:
BLIP-VQA rounded to 4 decimals, the other scorers raw), so acceptance here equals GORS's selection
on our export. ``filter.thresholds`` maps category names (T2I-CompBench's: color,
shape, texture, spatial, non_spatial, complex) to thresholds; ``{category}_template`` keys apply
to the benchmark's template prompts (the first 560 lines of a category's train file, which
``jobs/prompts.py`` marks in the ``template`` column). Anything else, or no category, uses
``filter.default_threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config import FilterConfig
from schemas.gors import reward_answer, selects

TEMPLATE_SUFFIX = "_template"


def threshold_for(category: str | None, fcfg: FilterConfig, template: bool = False) -> float:
    """The threshold a sample of ``category`` must exceed (the job records it per sample)."""
    if category and template and category + TEMPLATE_SUFFIX in fcfg.thresholds:
        return fcfg.thresholds[category + TEMPLATE_SUFFIX]
    if category and category in fcfg.thresholds:
        return fcfg.thresholds[category]
    return fcfg.default_threshold


def passes(score: float, threshold: float, scorer: str | None = None) -> bool:
    """GORS's ``reward > threshold`` on the value the benchmark writes for ``scorer`` (float32)."""
    return selects(reward_answer(scorer, score), threshold)


def accept(score: float, category: str | None, fcfg: FilterConfig, template: bool = False,
           scorer: str | None = None) -> bool:
    return passes(score, threshold_for(category, fcfg, template), scorer)


def selection_record(fcfg: FilterConfig) -> dict[str, Any]:
    """How this run selects, for its exactness record: GORS's rule, the thresholds, and each threshold
    that is an inferred reading (``filter.inferred``) as a deviation with its reason."""
    devs = [f"{cat} threshold {fcfg.thresholds[cat]:g} is inferred: {why}"
            for cat, why in sorted(fcfg.inferred.items())]
    return {
        "rule": "score > threshold, float32, on the value the benchmark writes (BLIP-VQA rounded to 4 decimals, "
                "the other scorers raw): GORS_finetune/train_dataset.py",
        "thresholds": dict(fcfg.thresholds), "default_threshold": fcfg.default_threshold,
        "exact": not devs, "deviations": devs,
    }


@dataclass(frozen=True)
class Decision:
    accepted: bool
    threshold: float


def decide(
    score: float, category: str | None, fcfg: FilterConfig, template: bool = False, scorable: bool = True,
    scorer: str | None = None,
) -> Decision:
    """Accept/reject together with the threshold used. ``scorable``: the prompt had a question to
    ask; an unscorable prompt's 1.0 is accepted only with ``filter.accept_unscorable``. ``scorer``:
    the judging scorer's name (None: BLIP-VQA), which fixes how the benchmark writes the value."""
    threshold = threshold_for(category, fcfg, template)
    accepted = passes(score, threshold, scorer) and (scorable or fcfg.accept_unscorable)
    return Decision(accepted=accepted, threshold=threshold)
