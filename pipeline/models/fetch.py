"""``models fetch``: the models a config names, downloaded, verified and converted where the config looks.

The caller says what is needed (``Need``: the config key, its hub id or folder; jobs/models.py derives them
from a config). Each need is one of: a hub repository in data/models.yaml (``hub_fetch``), a folder the
project's converter makes from the Salesforce files (``converted``: downloaded by ``download``, converted,
checked, recorded), a folder of the user's own (left alone), a hub id the project cannot load (refused), or
another hub id (fetched with the table's generic patterns, sizes checked by the hub only). Nothing lands under
a final name before it is checked.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.models.download import RetryPolicy, fetch_file
from pipeline.models.hub_fetch import COMMIT, RepoResult, VerifiedStamps, fetch_repo, read_ref, repo_dir
from pipeline.models.manifest import ConvertedSpec, HubRepo, Manifest

# Where models.referee and models.vqa point by default (pipeline/config.py): --cache changes it.
DEFAULT_MODELS_DIR = "~/.cache/referee-synth"
CONVERSION_RECORD = "conversion.json"
DOWNLOADS = "downloads"  # the Salesforce files, below the models folder
STAMPS = "verified"  # which hub files were checked (so a second run does not hash them again)
FETCH_COMMAND = "referee-synth models fetch"
REJECTED_SUFFIX = ".rejected"


@dataclass(frozen=True)
class Need:
    role: str  # the config key that names the model
    source: str  # what it names (hub id or folder)
    what: str  # in words
    folder: Path | None = None  # the source as a local folder (expanded); None for a hub id


@dataclass
class Target:
    """One thing to fetch: a hub repo or a converted folder, and the config keys that need it."""

    kind: str  # "hub" | "converted" | "folder" (the user's own) | "missing"
    key: str  # repo id, converted name or folder
    roles: list[str] = field(default_factory=list)
    repo: HubRepo | None = None
    converted: ConvertedSpec | None = None
    folder: Path | None = None  # converted: where it is written; folder: the user's
    configured: str = ""  # the config's value, when it differs from where the folder is written


def plan(needs: list[Need], revision: str, manifest: Manifest, models_dir: Path) -> list[Target]:
    """Needs grouped into targets (one per repo / folder), hub repos first, tokenizers before conversions."""
    targets: dict[tuple[str, str], Target] = {}

    def add(kind: str, key: str, role: str | None, **kw: Any) -> Target:
        t = targets.setdefault((kind, key), Target(kind, key, **kw))
        if role and role not in t.roles:
            t.roles.append(role)
        return t

    for need in needs:
        if need.folder is not None:
            path = need.folder
            spec = manifest.converted.get(path.name)
            if spec is not None:
                target = models_dir / spec.name
                add("converted", spec.name, need.role, converted=spec, folder=target,
                    configured="" if path == target else str(path))
            elif path.is_dir():
                add("folder", str(path), need.role, folder=path)
            else:
                add("missing", str(path), need.role, folder=path)
        elif need.source in manifest.unusable:
            add("unusable", need.source, need.role)
        elif need.source in manifest.hub:
            add("hub", need.source, need.role, repo=manifest.hub[need.source])
        else:  # a hub id the manifest does not list: its common files, at the config's revision, unverified
            add("hub", need.source, need.role, repo=HubRepo(need.source, revision, {},
                                                            tuple(manifest.other_hub_patterns)))
    for t in [t for t in targets.values() if t.kind == "converted"]:
        add("hub", t.converted.tokenizer, None, repo=manifest.hub[t.converted.tokenizer])
    order = {"hub": 0, "converted": 1, "folder": 2, "missing": 3, "unusable": 4}
    return sorted(targets.values(), key=lambda t: order[t.kind])


# --- converted folders ---------------------------------------------------------------------------------------

# What each converter writes: (subfolder, model class) whose key set and shapes the folder must have.
CONVERTED_MODELS = {
    "blip2": [("", "transformers:Blip2ForImageTextRetrieval"),
              ("caption_head", "pipeline.models.loading:Blip2CaptionHead")],  # wherever the loader takes it from
    "blip-vqa": [("", "transformers:BlipForQuestionAnswering")],
}


def _class(target: str) -> Any:
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _dotted(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def folder_files(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file below ``folder`` but the conversion record."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != CONVERSION_RECORD}


def read_record(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / CONVERSION_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def record_problem(folder: Path, spec: ConvertedSpec) -> str | None:
    """Why ``folder`` is not the complete, checked conversion ``spec`` describes (None: it is). No torch."""
    if not folder.is_dir():
        return "missing"
    record = read_record(folder)
    if record is None:
        return f"no {CONVERSION_RECORD} (not made by `{FETCH_COMMAND}`)"
    if record.get("converter") != spec.converter or record.get("expect") != spec.expect:
        return f"{CONVERSION_RECORD} describes another conversion"
    files = folder_files(folder)
    for name, size in (record.get("files") or {}).items():
        if files.get(name) != size:
            return f"{name} is {'missing' if name not in files else f'{files[name]} bytes, recorded {size}'}"
    return None


def check_converted(folder: Path, spec: ConvertedSpec) -> None:
    """The converted folder has the recorded architecture and exactly the model's key set and shapes."""
    import torch
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    for key, want in spec.expect.items():
        got = _dotted(config, key)
        if got != want:
            raise UserError(f"{spec.name}: converted config has {key} = {got}, expected {want}: the downloaded "
                            "checkpoint is not the released one")
    for sub, target in CONVERTED_MODELS[spec.converter]:
        cls = _class(target)
        where = folder / sub if sub else folder
        with torch.device("meta"):
            model = cls(cls.config_class.from_pretrained(where))
        tied = set(getattr(model, "all_tied_weights_keys", None) or {})
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
        with safe_open(where / "model.safetensors", framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        if stored != expected:
            diff = sorted(set(stored) ^ set(expected)) or sorted(k for k in stored if stored[k] != expected[k])
            raise UserError(f"{spec.name}: converted {sub or 'model'} weights differ from the model's key set and "
                            f"shapes (e.g. {diff[0]})")


def _convert(spec: ConvertedSpec, inputs: dict[str, Path], tokenizer: Path, out: Path) -> None:
    if spec.converter == "blip2":
        from pipeline.models.convert_blip2 import convert_lavis_blip2

        convert_lavis_blip2(inputs["lavis_checkpoint"], out, tokenizer,
                            vision_checkpoint=inputs.get("vision_checkpoint"))
    elif spec.converter == "blip-vqa":
        from pipeline.models.convert_blip_vqa import convert_blip_vqa

        convert_blip_vqa(inputs["checkpoint"], out, tokenizer)
    else:
        raise UserError(f"{spec.name}: unknown converter {spec.converter!r}")


def _write_record(folder: Path, spec: ConvertedSpec, sources: dict[str, Any], tokenizer: RepoResult | None,
                  how: str) -> None:
    from pipeline.versions import _version, code_version

    record = {
        "converter": spec.converter, "name": spec.name, "made_by": how,
        "project_version": _version("referee-synth") or "unknown",
        "code_version": code_version(), "transformers": _version("transformers"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": sources, "tokenizer": {"repo": spec.tokenizer, "commit": tokenizer.commit if tokenizer else None},
        "expect": spec.expect, "files": folder_files(folder),
    }
    (folder / CONVERSION_RECORD).write_text(json.dumps(record, indent=1) + "\n")


def set_aside_folder(folder: Path) -> Path:
    aside = folder.with_name(folder.name + REJECTED_SUFFIX)
    if aside.exists():
        shutil.rmtree(aside)
    os.rename(folder, aside)
    return aside


# --- the whole fetch -----------------------------------------------------------------------------------------


@dataclass
class Options:
    models_dir: Path
    base_url: str | None = None
    token: str | None = None
    hub_cache: Path | None = None  # default: huggingface_hub's (HF_HUB_CACHE / HF_HOME)
    endpoint: str | None = None  # default: HF_ENDPOINT
    progress: bool = True
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    sleep: Callable[[float], None] = time.sleep


@dataclass
class Line:
    """One row of the fetch report."""

    status: str  # "ok" | "fetched" | "converted" | "skipped"
    what: str
    detail: str
    roles: list[str] = field(default_factory=list)


def human(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def _hub_line(t: Target, r: RepoResult) -> Line:
    verified = len(t.repo.files)
    detail = f"@{r.commit[:12]}, {human(r.size)}, {verified} files checked against their digests"
    if r.unverified or not t.repo.files:
        detail += f"; no digest recorded for {', '.join(r.unverified) or 'any file (not in data/models.yaml)'}"
    detail += "".join(f"; {n}" for n in r.notes)
    return Line("fetched" if r.downloaded else "ok", t.key, detail, t.roles)


def _fetch_converted(t: Target, manifest: Manifest, opts: Options, tokenizer: RepoResult | None) -> Line:
    spec, folder = t.converted, t.folder
    problem = record_problem(folder, spec)
    if problem is None:
        return Line("ok", str(folder), f"converted ({spec.converter}), {human(sum(folder_files(folder).values()))}",
                    t.roles)
    if folder.exists():
        if problem.startswith("no "):  # made by hand: keep it if it passes the same checks
            try:
                check_converted(folder, spec)
            except (UserError, OSError, ValueError) as err:  # the user's own work: never moved, never used
                raise UserError(f"{folder} is there without {CONVERSION_RECORD} and fails the check "
                                f"({str(err).splitlines()[0]}); move it away and run models fetch again") from None
            _write_record(folder, spec, {}, None, "found in place, checked by models fetch")
            return Line("ok", str(folder), "made by hand; key set, shapes and architecture checked", t.roles)
        aside = set_aside_folder(folder)
        print(f"{folder}: {problem}; moved aside to {aside.name}", file=sys.stderr)
    if tokenizer is None:
        raise UserError(f"{spec.name}: the tokenizer {spec.tokenizer} was not fetched")
    downloads = opts.models_dir / DOWNLOADS
    inputs, sources = {}, {}
    for arg, name in spec.inputs.items():
        url = manifest.url(name, opts.base_url)
        got = fetch_file(manifest.files[name], url, downloads, policy=opts.policy, progress=opts.progress,
                         sleep=opts.sleep)
        inputs[arg] = got.path
        sources[name] = {"url": url, "size": got.size, "sha256": got.sha256,
                         "digest": "trust on first use" if got.trusted_on_first_use or not manifest.files[name].sha256
                         else "recorded"}
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=folder.parent))
    try:
        out = work / spec.name
        print(f"{spec.name}: converting ({spec.converter})", file=sys.stderr)
        _convert(spec, inputs, tokenizer.snapshot, out)
        check_converted(out, spec)
        _write_record(out, spec, sources, tokenizer, FETCH_COMMAND)
        os.rename(out, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Line("converted", str(folder), f"{spec.converter} from {', '.join(spec.inputs.values())}, "
                f"{human(sum(folder_files(folder).values()))}; key set, shapes and architecture checked", t.roles)


@contextmanager
def _one_fetch_at_a_time(models_dir: Path):
    """An exclusive lock on the models folder: a second fetch (another shell, a node sharing the volume) waits."""
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / ".models-fetch.lock", "a") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            yield
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another models fetch is working in {models_dir}; waiting for it", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch_models(needs: list[Need], revision: str, manifest: Manifest,
                 opts: Options) -> tuple[list[Line], list[str]]:
    """Fetch ``needs`` (hub ids at ``revision``, models.revision); (report lines, ``--set`` overrides the
    config needs to find what was written)."""
    with _one_fetch_at_a_time(opts.models_dir):
        return _fetch_models(needs, revision, manifest, opts)


def _fetch_models(needs: list[Need], revision: str, manifest: Manifest,
                  opts: Options) -> tuple[list[Line], list[str]]:
    targets = plan(needs, revision, manifest, opts.models_dir)
    unusable = [t for t in targets if t.kind == "unusable"]
    if unusable:
        t = unusable[0]
        raise UserError(f"{t.roles[0]}: {t.key} {manifest.unusable[t.key]}")
    missing = [t for t in targets if t.kind == "missing"]
    if missing:
        t = missing[0]
        raise UserError(f"{t.roles[0]}: folder {t.key} does not exist and models fetch cannot make it (it makes "
                        f"{', '.join(manifest.converted)}); point {t.roles[0]} at an existing folder or a hub id")
    pending = {t.converted.tokenizer for t in targets
               if t.kind == "converted" and record_problem(t.folder, t.converted) is not None}
    refs = (revision,)
    stamps = opts.models_dir / STAMPS
    lines: list[Line] = []
    repos: dict[str, RepoResult] = {}
    for t in targets:
        if t.kind == "hub":
            if not t.roles and t.key not in pending:
                continue  # a converter's tokenizer, and nothing left to convert
            repos[t.key] = fetch_repo(t.repo, refs=refs, cache_dir=opts.hub_cache, stamps_dir=stamps,
                                      token=opts.token, endpoint=opts.endpoint, progress=opts.progress,
                                      policy=opts.policy, sleep=opts.sleep)
            lines.append(_hub_line(t, repos[t.key]))
        elif t.kind == "converted":
            lines.append(_fetch_converted(t, manifest, opts, repos.get(t.converted.tokenizer)))
        else:
            lines.append(Line("skipped", t.key, "your own folder: not managed by models fetch", t.roles))
    sets = [f"--set {role}={t.folder}" for t in targets if t.kind == "converted" and t.configured for role in t.roles]
    return lines, sets


# --- what is there, without network or hashing (doctor) -----------------------------------------------------


@dataclass
class Status:
    target: Target
    ok: bool
    detail: str


def _hub_status(t: Target, revision: str, models_dir: Path, hub_cache: Path | None) -> Status:
    commit = revision if COMMIT.match(revision) else read_ref(t.key, revision, hub_cache)
    snapshot = repo_dir(t.key, hub_cache) / "snapshots" / (commit or "-")
    if commit is None or not snapshot.is_dir():
        return Status(t, False, f"not in the Hugging Face cache at revision {revision}")
    names = list(t.repo.files) or ["config.json" if "stable_diffusion" not in " ".join(t.roles) else "unet/config.json"]
    absent = [n for n in names if not (snapshot / n).is_file()]
    if absent:
        return Status(t, False, f"@{commit[:12]}: {absent[0]} missing from the cache ({len(absent)} of {len(names)})")
    size = sum((snapshot / n).stat().st_size for n in names)
    stamps = VerifiedStamps(models_dir / STAMPS, t.key, commit)
    if not t.repo.files:
        how = "not listed in data/models.yaml: files not checked"
    elif commit != t.repo.revision:
        how = f"another commit than data/models.yaml's {t.repo.revision[:12]}: not checked"
    elif all(stamps.current(snapshot / n, t.repo.files[n]) for n in names):
        how = f"{len(names)} files checked by models fetch"
    else:
        how = "present, not checked by models fetch"
    return Status(t, True, f"@{commit[:12]}, {human(size)}, {how}")


def _converted_status(t: Target, configured: Path) -> Status:
    problem = record_problem(configured, t.converted)
    if problem is None:
        r = read_record(configured) or {}
        return Status(t, True, f"{human(sum(folder_files(configured).values()))}, converted ({t.converted.converter}) "
                               f"by referee-synth {r.get('project_version')} ({r.get('code_version')}), "
                               f"transformers {r.get('transformers')}, {r.get('created')}")
    if configured.is_dir() and problem.startswith("no ") and (configured / "config.json").is_file():
        return Status(t, True, f"{human(sum(folder_files(configured).values()))}, made by hand ({problem})")
    return Status(t, False, problem if configured.exists() else "missing")


def status(needs: list[Need], revision: str, manifest: Manifest, models_dir: Path,
           hub_cache: Path | None = None) -> list[Status]:
    """Each needed model: present (with sizes and provenance) or not, from the disk alone."""
    out = []
    for t in plan(needs, revision, manifest, models_dir):
        if not t.roles:
            continue  # a converter's tokenizer: not loaded by runs
        if t.kind == "hub":
            out.append(_hub_status(t, revision, models_dir, hub_cache))
        elif t.kind == "converted":
            out.append(_converted_status(t, Path(t.configured) if t.configured else t.folder))
        elif t.kind == "folder":
            out.append(Status(t, True, f"your own folder, {human(sum(folder_files(t.folder).values()))}"))
        elif t.kind == "unusable":
            out.append(Status(t, False, manifest.unusable[t.key]))
        else:
            out.append(Status(t, False, "missing (not a folder models fetch makes)"))
    return out
