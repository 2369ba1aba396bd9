"""Accept or reject a scored sample: ``score >= threshold``, the threshold chosen by category.

``filter.thresholds`` maps category names (T2I-CompBench's: color, shape, texture, spatial,
non_spatial, complex; ``*_template`` for template prompts in the gors preset) to thresholds;
anything else, or no category, uses ``filter.default_threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import FilterConfig


def threshold_for(category: str | None, fcfg: FilterConfig) -> float:
    """The threshold a sample of ``category`` must reach (the job records it per sample)."""
    if category and category in fcfg.thresholds:
        return fcfg.thresholds[category]
    return fcfg.default_threshold


def accept(score: float, category: str | None, fcfg: FilterConfig) -> bool:
    return score >= threshold_for(category, fcfg)


@dataclass(frozen=True)
class Decision:
    accepted: bool
    threshold: float


def decide(score: float, category: str | None, fcfg: FilterConfig) -> Decision:
    """Accept/reject together with the threshold used."""
    threshold = threshold_for(category, fcfg)
    return Decision(accepted=score >= threshold, threshold=threshold)
