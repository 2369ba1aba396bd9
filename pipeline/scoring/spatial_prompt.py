"""A 2D-spatial prompt as T2I-CompBench reads it: (first noun, relation phrase, last noun).

The benchmark's UniDet evaluation (``UniDet_eval/2D_spatial_eval.py``, simple prompts) takes the
first of its relation phrases that occurs in the prompt as a substring, in its list's order, and
the prompt's first and last spaCy NOUN tokens as the two objects; "girl", "boy", "man" and "woman"
become "person" (the detector's class). Both the spatial scorer and the detection referee read
prompts through this one parse. "on top of" is in the benchmark's phrase list, but its rule has no
branch for it (the position term is 0); that is kept, and recorded by the scorer.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.scoring.questions import load_spacy

# The benchmark's order matters: "a cup near a table on the left of ..." reads as "near".
SPATIAL_PHRASES = (
    "on side of", "next to", "near", "on the left of", "on the right of", "on the bottom of", "on the top of",
    "on top of",
)
PERSON_WORDS = ("girl", "boy", "man", "woman")


@dataclass(frozen=True)
class SpatialPrompt:
    subject: str  # object A (the first noun)
    relation: str  # one of SPATIAL_PHRASES
    object: str  # object B (the last noun)


def find_relation(prompt: str) -> str | None:
    """The first of ``SPATIAL_PHRASES`` contained in the prompt (the benchmark's substring test)."""
    return next((phrase for phrase in SPATIAL_PHRASES if phrase in prompt), None)


def _as_class(noun: str) -> str:
    return "person" if noun in PERSON_WORDS else noun


def parse_spatial(prompt: str, spacy_model: str = "en_core_web_sm") -> SpatialPrompt | None:
    """(A, relation, B) of a spatial prompt; None when it has no relation phrase or no noun."""
    relation = find_relation(prompt)
    if relation is None:
        return None
    nouns = [token.text for token in load_spacy(spacy_model)(prompt) if token.pos_ == "NOUN"]
    if not nouns:
        return None  # the benchmark would fail on such a prompt (it indexes the noun list)
    return SpatialPrompt(subject=_as_class(nouns[0]), relation=relation, object=_as_class(nouns[-1]))
