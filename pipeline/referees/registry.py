"""Referee kinds -> the class that implements each (the table: ``pipeline/referee_kinds.py``).

A new referee is one module in this folder implementing ``pipeline.referees.base.ZooReferee`` plus one
line in that table. Entries are import paths, so the job's driver can check kinds without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from pipeline.referee_kinds import REFEREE_KINDS, RefereeKind

__all__ = ["REFEREE_KINDS", "RefereeKind", "coverage_warnings", "referee_class"]


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
