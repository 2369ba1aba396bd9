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


# --- what the benchmark's rule reads, including the cases parse_spatial leaves out ---------------

# The complex branch's own phrase list (2D_spatial_eval.py --complex): matched on 3-, 2- then 1-token spans.
COMPLEX_PREPOSITIONS = ("on top of", "on bottom of", "on the left", "on the right", "next to", "on side of", "near")


@dataclass(frozen=True)
class RuleInput:
    """The objects and relation the benchmark's rule scores; any may be None (it then scores what it can)."""

    subject: str | None
    relation: str | None
    object: str | None
    parsed: bool = True  # False: the benchmark itself would fail on this prompt (a simple one without nouns)


def _complex_objects(doc) -> list[str]:
    """The noun before and after each complex preposition, as the benchmark walks the tokens."""
    objects: list[str] = []
    n = len(doc)
    for i in range(n):
        width = next((k for k in (3, 2, 1) if doc[i:i + k].text in COMPLEX_PREPOSITIONS), 0)
        if not width:
            continue
        before = next((doc[j].text for j in range(i - 1, -1, -1) if doc[j].pos_ in ("NOUN", "PROPN")), None)
        if before is not None:
            objects.append(before)
        after = next((doc[j].text for j in range(i + width, n) if doc[j].pos_ == "NOUN"), None)
        if after is not None:
            objects.append(after)
        elif i + width < n and doc[n - 1].pos_ != "NOUN":
            # no noun after the phrase: the first proper noun that ends a proper-noun run
            after = next((doc[j].text for j in range(i + width, n - 1)
                          if doc[j].pos_ == "PROPN" and doc[j + 1].pos_ != "PROPN"), None)
            if after is not None:
                objects.append(after)
    return objects


def rule_input(prompt: str, spacy_model: str = "en_core_web_sm", complex_prompt: bool = False) -> RuleInput:
    """The benchmark's reading of a prompt for its 2D rule: the relation is always the first of
    ``SPATIAL_PHRASES`` in the prompt (None if none); the objects are the first and last NOUN
    (simple prompts) or the two nouns around the complex prepositions (exactly two, else none)."""
    relation = find_relation(prompt)
    doc = load_spacy(spacy_model)(prompt)
    if complex_prompt:
        objects = _complex_objects(doc)
        a, b = (objects[0], objects[1]) if len(objects) == 2 else (None, None)
        return RuleInput(_as_class(a) if a else None, relation, _as_class(b) if b else None)
    nouns = [token.text for token in doc if token.pos_ == "NOUN"]
    if not nouns:
        return RuleInput(None, relation, None, parsed=False)
    return RuleInput(_as_class(nouns[0]), relation, _as_class(nouns[-1]))
