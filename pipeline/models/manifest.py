"""The table of model files ``models fetch`` downloads (data/models.yaml): URLs, sizes, digests, repo ids.

Plain data, no network: the downloader (``download.py``), the hub fetch (``hub_fetch.py``) and the
converted-folder checks (``fetch.py``) read it; ``--manifest FILE`` replaces it (a mirror's own table, tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UserError

MANIFEST_PATH = Path(__file__).resolve().parents[2] / "data" / "models.yaml"
BASE_URL_ENV = "REFEREE_SYNTH_MODELS_URL"  # a mirror or proxy of base_url, same paths below it
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class FileSpec:
    """One file and what it must be: size in bytes and sha256 (LFS / plain files) or git blob sha1."""

    name: str  # file name (plain files) or path inside the repo (hub files)
    size: int | None = None
    sha256: str | None = None
    git_sha1: str | None = None
    path: str = ""  # plain files: the path below base_url
    source: str = ""  # where the URL was read

    @property
    def has_digest(self) -> bool:
        return bool(self.sha256 or self.git_sha1)


@dataclass(frozen=True)
class ConvertedSpec:
    """A model folder the project's converter makes from plain files plus a tokenizer repo."""

    name: str
    converter: str  # "blip2" | "blip-vqa"
    inputs: dict[str, str]  # converter argument -> file name in `files`
    tokenizer: str  # hub repo id holding the bert-base-uncased tokenizer
    expect: dict[str, Any] = field(default_factory=dict)  # dotted config.json key -> value


@dataclass(frozen=True)
class HubRepo:
    repo_id: str
    revision: str
    files: dict[str, FileSpec]
    unverified: tuple[str, ...] = ()  # read by the loaders, no digest known: size-checked by the hub only

    @property
    def allow_patterns(self) -> list[str]:
        return [*self.files, *self.unverified]


@dataclass(frozen=True)
class Manifest:
    base_url: str
    files: dict[str, FileSpec]
    converted: dict[str, ConvertedSpec]
    hub: dict[str, HubRepo]
    other_hub_patterns: tuple[str, ...] = ()  # a hub id the table does not list: these files, unverified
    unusable: dict[str, str] = field(default_factory=dict)  # hub id -> why the project cannot load it
    path: Path | None = None

    def url(self, name: str, base_url: str | None = None) -> str:
        """The file's URL below ``base_url`` (default: $REFEREE_SYNTH_MODELS_URL, else the manifest's)."""
        base = base_url or os.environ.get(BASE_URL_ENV) or self.base_url
        return f"{base.rstrip('/')}/{self.files[name].path.lstrip('/')}"


def _fail(path: Path, why: str) -> UserError:
    return UserError(f"model manifest {path}: {why}")


def _file(name: str, raw: Any, path: Path, where: str = "files") -> FileSpec:
    label = f"{where}.{name}"
    if not isinstance(raw, dict):
        raise _fail(path, f"{label}: expected a mapping with size and sha256 / git_sha1")
    unknown = set(raw) - {"size", "sha256", "git_sha1", "path", "source"}
    if unknown:
        raise _fail(path, f"{label}: unknown field {sorted(unknown)[0]}")
    size = raw.get("size")
    if size is not None and (not isinstance(size, int) or size < 0):
        raise _fail(path, f"{label}: size must be a whole number of bytes or null")
    digests = {k: raw.get(k) for k in ("sha256", "git_sha1")}
    for key, value in digests.items():
        width = 64 if key == "sha256" else 40
        if value is not None and (not isinstance(value, str) or len(value) != width
                                  or any(c not in "0123456789abcdef" for c in value)):
            raise _fail(path, f"{label}: {key} must be {width} lower-case hex digits or null")
    return FileSpec(name=name, size=size, path=str(raw.get("path", "")), source=str(raw.get("source", "")),
                    **digests)


def parse_manifest(data: Any, path: Path) -> Manifest:
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        raise _fail(path, f"expected a mapping with version: {MANIFEST_VERSION}")
    files = {n: _file(n, raw, path) for n, raw in (data.get("files") or {}).items()}
    for name, spec in files.items():
        if not spec.path:
            raise _fail(path, f"files.{name}: no path")
    converted = {}
    for name, raw in (data.get("converted") or {}).items():
        try:
            spec = ConvertedSpec(name=name, converter=raw["converter"], inputs=dict(raw["inputs"]),
                                 tokenizer=raw["tokenizer"], expect=dict(raw.get("expect") or {}))
        except (KeyError, TypeError):
            raise _fail(path, f"converted.{name}: needs converter, inputs and tokenizer") from None
        missing = [f for f in spec.inputs.values() if f not in files]
        if missing:
            raise _fail(path, f"converted.{name}: input {missing[0]} is not under files")
        converted[name] = spec
    hub = {}
    for repo_id, raw in (data.get("hub") or {}).items():
        if not isinstance(raw, dict) or not raw.get("revision"):
            raise _fail(path, f"hub.{repo_id}: needs a revision")
        hub[repo_id] = HubRepo(
            repo_id=repo_id, revision=str(raw["revision"]),
            files={n: _file(n, spec, path, f"hub.{repo_id}") for n, spec in (raw.get("files") or {}).items()},
            unverified=tuple(raw.get("unverified") or ()),
        )
    for spec in converted.values():
        if spec.tokenizer not in hub:
            raise _fail(path, f"converted.{spec.name}: tokenizer {spec.tokenizer} is not under hub")
    return Manifest(base_url=str(data.get("base_url", "")), files=files, converted=converted, hub=hub,
                    other_hub_patterns=tuple(data.get("other_hub_patterns") or ()),
                    unusable={str(k): str(v) for k, v in (data.get("unusable") or {}).items()}, path=path)


def load_manifest(path: str | Path | None = None) -> Manifest:
    """The shipped table, or ``path``; a missing or malformed file is one line."""
    path = Path(path) if path else MANIFEST_PATH
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise _fail(path, f"cannot read ({err.strerror or type(err).__name__})") from None
    except yaml.YAMLError:
        raise _fail(path, "not valid YAML") from None
    return parse_manifest(data, path)
