"""The T2I-CompBench prompt lists the project ships (data/t2i-compbench/, MIT licence, see its LICENSE)."""

from __future__ import annotations

from pathlib import Path

# The repository's own copy: a clone needs nothing beside it.
COMPBENCH_DIR = Path(__file__).resolve().parents[2] / "data" / "t2i-compbench"
# Lines 1-560 of each *_train.txt are template prompts, the rest natural ones: GORS
# (GORS_finetune/train_dataset.py) tells them apart by `index < 560` in the train list.
TEMPLATE_PROMPTS = 560
TRAIN_SUFFIX = "_train"


def compbench_file(name: str) -> Path:
    """The shipped list ``name`` (e.g. ``color_val``), as a path; raises FileNotFoundError when absent."""
    path = COMPBENCH_DIR / f"{name}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such T2I-CompBench list (shipped ones: {available()})")
    return path


def available() -> list[str]:
    """Names of the shipped lists, e.g. ``['color_train', 'color_val', ...]``."""
    return sorted(p.stem for p in COMPBENCH_DIR.glob("*.txt"))


def template_flags(lines: list[str], train: bool) -> list[bool]:
    """Per line: a template prompt by GORS's rule, on the FIRST occurrence of its text (``list.index``)."""
    first: dict[str, int] = {}
    for i, line in enumerate(lines):
        first.setdefault(line.split("\t")[0], i)
    return [train and first[line.split("\t")[0]] < TEMPLATE_PROMPTS for line in lines]


# UniDet's unified label names (data/t2i-compbench/unidet/labels.txt): the only object names the
# benchmark's 2D-spatial rule can find.
UNIDET_LABELS = COMPBENCH_DIR / "unidet" / "labels.txt"


def unidet_labels() -> frozenset[str]:
    return frozenset(line for line in UNIDET_LABELS.read_text(encoding="utf-8").splitlines() if line)
