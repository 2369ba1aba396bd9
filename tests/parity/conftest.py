"""The reference-parity suite: the project's converters + loaders + forward against the ORIGINAL code.

Collected only when ``REFEREE_SYNTH_PARITY=1`` (``make parity`` sets it): it builds a second virtual
environment (tests/parity/reference_env.py), so the normal ``make test`` leaves it out. Every compared
output's max abs difference is printed in the run's summary.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.parity import reference_env
from tests.parity.settings import ENABLED, FULL, SUBPROCESS_TIMEOUT, TOLERANCE

if not ENABLED:
    collect_ignore_glob = ["test_*.py"]

HERE = Path(__file__).resolve().parent


@dataclass
class Row:
    name: str
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


_ROWS: list[Row] = []
_NOTES: list[str] = []


def max_abs_diff(expected: torch.Tensor, got: torch.Tensor) -> float:
    assert expected.shape == got.shape, (tuple(expected.shape), tuple(got.shape))
    return float((expected.double() - got.double()).abs().max())


@pytest.fixture(scope="session")
def compare():
    """``compare(name, expected, got, tolerance)``: record the max abs difference, then assert it."""

    def check(name: str, expected: torch.Tensor, got: torch.Tensor, tolerance: float = TOLERANCE) -> float:
        diff = max_abs_diff(torch.as_tensor(expected), torch.as_tensor(got))
        _ROWS.append(Row(name, diff, tolerance))
        assert diff <= tolerance, f"{name}: max abs difference {diff:.3g} > {tolerance:g}"
        return diff

    return check


@pytest.fixture(scope="session")
def note():
    """``note(text)``: a line for the summary (inferred configs, timings)."""
    return _NOTES.append


@pytest.fixture(scope="session")
def reference_python(note) -> reference_env.ReferenceEnv:
    start = time.monotonic()
    try:
        env = reference_env.ensure(report=note)
    except reference_env.ReferenceEnvError as err:
        pytest.fail(str(err), pytrace=False)
    note(f"reference environment ready in {time.monotonic() - start:.1f} s")
    return env


@pytest.fixture(scope="session")
def reference_dir(reference_python, tmp_path_factory, note) -> Path:
    """Checkpoints in the released formats and the original code's outputs (tests/parity/make_reference.py)."""
    out = tmp_path_factory.mktemp("reference")
    start = time.monotonic()
    proc = subprocess.run(
        [str(reference_python.python), str(HERE / "make_reference.py"), "--out", str(out),
         "--vocab-dir", str(reference_python.vocab_dir), *(["--full"] if FULL else [])],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    note(f"original code (reference env, {'full' if FULL else 'reduced'} sizes) ran in "
         f"{time.monotonic() - start:.1f} s")
    return out


@pytest.fixture(scope="session")
def bert_tokenizer_dir(reference_python, tmp_path_factory) -> Path:
    """A bert-base-uncased tokenizer folder for the project's converters (--tokenizer), from the same vocab."""
    from transformers import BertTokenizer

    out = tmp_path_factory.mktemp("bert-base-uncased")
    BertTokenizer.from_pretrained(str(reference_python.vocab_dir)).save_pretrained(out)  # uncased: lower-cases
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not (_ROWS or _NOTES):
        return
    tr = terminalreporter
    tr.section("reference parity")
    for line in _NOTES:
        tr.write_line(line)
    if _ROWS:
        width = max(len(r.name) for r in _ROWS)
        tr.write_line(f"{'compared output':<{width}}  {'max abs diff':>12}  tolerance")
        for r in _ROWS:
            tr.write_line(f"{r.name:<{width}}  {r.max_abs_diff:>12.3e}  {r.tolerance:g}{'' if r.ok else '  FAIL'}")
