"""Which object names the 2D-spatial rule can find (``scoring.spatial_vocabulary``).

``open``: any noun (OWLv2 is queried with the nouns themselves). ``unidet``: only a noun equal to one
of UniDet's unified label names, as the benchmark matches its detections (``label == noun``); any
other noun is never found. One object alone scores at most 0.25 and the rule zeroes every score
below 0.5, so a prompt is scorable under a vocabulary only when both its objects are findable.

    python -m pipeline.scoring.spatial_vocabulary     # counts for the shipped spatial lists
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from pipeline.io.compbench_data import compbench_file, unidet_labels
from pipeline.scoring.spatial_prompt import rule_input

OPEN, UNIDET = "open", "unidet"
VOCABULARIES = (OPEN, UNIDET)


@functools.lru_cache(maxsize=1)
def _labels() -> frozenset[str]:
    return unidet_labels()


def findable(noun: str | None, vocabulary: str) -> bool:
    if noun is None:
        return False
    if vocabulary == OPEN:
        return True
    if vocabulary == UNIDET:
        return noun in _labels()
    raise ValueError(f"unknown spatial vocabulary {vocabulary!r} (known: {', '.join(VOCABULARIES)})")


def unfindable(nouns: Iterable[str | None], vocabulary: str) -> list[str]:
    """The parsed nouns the vocabulary can never find (in order, once each)."""
    return list(dict.fromkeys(n for n in nouns if n is not None and not findable(n, vocabulary)))


def scorable_counts(prompts: list[str], spacy_model: str = "en_core_web_sm",
                    complex_prompt: bool = False) -> dict[str, int]:
    """Per vocabulary, how many prompts have both objects findable (the others always score 0)."""
    parses = [rule_input(p, spacy_model, complex_prompt) for p in prompts]
    return {v: sum(findable(r.subject, v) and findable(r.object, v) for r in parses) for v in VOCABULARIES}


def main() -> None:
    from pipeline.config import VqaConfig

    model = VqaConfig().spacy_model
    for name in ("spatial_val", "spatial_train"):
        lines = [x.strip() for x in compbench_file(name).read_text(encoding="utf-8").splitlines() if x.strip()]
        counts = scorable_counts(lines, model)
        print(f"{name}: {len(lines)} prompts; scorable with open: {counts[OPEN]}, with unidet: {counts[UNIDET]} "
              f"({counts[UNIDET] / len(lines):.1%})")


if __name__ == "__main__":
    main()
