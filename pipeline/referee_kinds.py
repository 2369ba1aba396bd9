"""The referee kinds a config's ``zoo.referees[].kind`` may name: kind -> "module:Class" and default model.

Names and import paths only (no torch), so the config checks kinds and the job's driver names models
without loading any; ``pipeline/referees/registry.py`` imports the class on first use. A new referee is one
module in ``pipeline/referees/`` plus one line here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RefereeKind:
    target: str  # "module:Class"
    default_model: str  # hub id used when an entry names no model ("" = the engine's own BLIP-2)


REFEREE_KINDS: dict[str, RefereeKind] = {
    "blip2": RefereeKind("pipeline.referees.blip2:Blip2Referee", ""),
    "clip": RefereeKind("pipeline.referees.clip:ClipReferee", "openai/clip-vit-large-patch14"),
    "detector": RefereeKind("pipeline.referees.detector:DetectorReferee", "google/owlv2-base-patch16-ensemble"),
}
