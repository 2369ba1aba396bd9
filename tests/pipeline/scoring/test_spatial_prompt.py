from __future__ import annotations

from pipeline.io.compbench_data import COMPBENCH_DIR
from pipeline.scoring.spatial_prompt import SpatialPrompt, find_relation, parse_spatial


def test_relation_is_the_first_phrase_of_the_benchmark_list() -> None:
    assert find_relation("a dog on the left of a cat") == "on the left of"
    assert find_relation("a cup near a bowl on the right of a book") == "near"
    assert find_relation("a red car and a blue bird") is None
    # "on the top of" comes before "on top of" in the list; both are substrings only of their own prompts.
    assert find_relation("a book on the top of a table") == "on the top of"
    assert find_relation("a book on top of a table") == "on top of"


def test_objects_are_the_first_and_last_nouns_with_people_as_person() -> None:
    assert parse_spatial("a dog on the left of a cat") == SpatialPrompt("dog", "on the left of", "cat")
    assert parse_spatial("a girl next to a chair") == SpatialPrompt("person", "next to", "chair")
    assert parse_spatial("a red car and a blue bird") is None


def test_every_shipped_spatial_val_prompt_parses() -> None:
    prompts = (COMPBENCH_DIR / "spatial_train.txt").read_text().splitlines()
    parsed = [parse_spatial(p) for p in prompts if p.strip()]
    assert len(parsed) >= 500 and sum(p is not None for p in parsed) / len(parsed) > 0.95
