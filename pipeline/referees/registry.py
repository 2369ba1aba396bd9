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
