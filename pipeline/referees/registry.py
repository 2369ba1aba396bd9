"""Referee kinds: a config's ``zoo.referees[].kind`` -> the class that implements it.

A new referee is one module in this folder implementing ``pipeline.referees.base.ZooReferee`` plus one
line here. Entries are import paths, so the job's driver can check kinds without importing torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RefereeKind:
    target: str  # "module:Class"
    default_model: str  # hub id used when an entry names no model ("" = the engine's own BLIP-2)


REFEREE_KINDS: dict[str, RefereeKind] = {
    "blip2": RefereeKind("pipeline.referees.blip2:Blip2Referee", ""),
    "clip": RefereeKind("pipeline.referees.clip:ClipReferee", "openai/clip-vit-large-patch14"),
    "detector": RefereeKind("pipeline.referees.detector:DetectorReferee", "google/owlv2-base-patch16-ensemble"),
}


def referee_class(kind: str) -> Any:
    """The class registered for ``kind`` (imported on first use)."""
    module, _, name = REFEREE_KINDS[kind].target.partition(":")
    return getattr(importlib.import_module(module), name)


def coverage_warnings(specs: list[Any], categories: dict[str | None, int]) -> list[str]:
    """What an operator should hear before a zoo run (``categories``: prompts per category in the input):
    a referee's category that no prompt has (a typo judges nothing), and prompts no referee judges (they
    get SDS alone; only each sample's ``referee_skipped`` would say so)."""
    lines = []
    for i, spec in enumerate(specs):
        unknown = sorted(c for c in spec.categories if c not in categories)
        if unknown:
            lines.append(f"zoo.referees[{i}] ({spec.name or spec.kind}) lists categories no prompt has: "
                         f"{', '.join(map(repr, unknown))[:200]} (a typo?)")
    judged = [s for s in specs if s.weight > 0]
    if judged:
        alone = {c: n for c, n in categories.items() if not any(not s.categories or c in s.categories for s in judged)}
        if alone:
            names = ", ".join(f"{c or '(none)'} ({n})" for c, n in sorted(alone.items(), key=lambda t: str(t[0])))
            lines.append(f"{sum(alone.values())} prompts are judged by no zoo referee (SDS alone): "
                         f"categories {names[:200]}")
    return lines
