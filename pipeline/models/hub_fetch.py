"""Hugging Face repositories into huggingface_hub's own cache, checked file by file against data/models.yaml.

``snapshot_download`` honours everything a user of ``hf download`` sets: ``HF_HOME`` / ``HF_HUB_CACHE``,
``HF_ENDPOINT`` (a mirror), ``HF_TOKEN`` or a stored login, ``HF_HUB_OFFLINE``. Two things it does not do
are done here (huggingface_hub 2.4): it checks sizes, not digests, so each file's sha256 (LFS) or git blob
id is checked, and a file that fails is moved aside (``BLOB.rejected``, its snapshot entry removed) so no
loader can pick it up; and fetching by commit writes no ``refs/main``, so the ref the runs ask for
(``models.revision``, ``main``) is pointed at the fetched commit, for offline ``from_pretrained``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UserError
from pipeline.models.download import DownloadError, RetryPolicy, TransientDownloadError, git_blob_sha1, sha256_file
from pipeline.models.manifest import FileSpec, HubRepo

COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass
class RepoResult:
    repo_id: str
    commit: str
    snapshot: Path
    downloaded: bool
    size: int = 0
    unverified: list[str] = field(default_factory=list)  # present files without a recorded digest
    notes: list[str] = field(default_factory=list)


def hub_cache_dir(cache_dir: str | Path | None = None) -> Path:
    from huggingface_hub import constants

    return Path(cache_dir) if cache_dir else Path(constants.HF_HUB_CACHE)


def repo_dir(repo_id: str, cache_dir: str | Path | None = None) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return hub_cache_dir(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model")


def read_ref(repo_id: str, ref: str, cache_dir: str | Path | None = None) -> str | None:
    try:
        return (repo_dir(repo_id, cache_dir) / "refs" / ref).read_text().strip() or None
    except OSError:
        return None


def write_ref(repo_id: str, ref: str, commit: str, cache_dir: str | Path | None = None) -> str | None:
    """Point ``refs/<ref>`` at ``commit`` (atomically); returns the commit it pointed at before, if another."""
    before = read_ref(repo_id, ref, cache_dir)
    if before == commit:
        return None
    path = repo_dir(repo_id, cache_dir) / "refs" / ref
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(commit)
    os.replace(tmp, path)
    return before


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _digest_of(path: Path, spec: FileSpec) -> tuple[str, str]:
    """(kind, value) of the digest ``spec`` records for ``path``."""
    if spec.sha256:
        return "sha256", sha256_file(path)
    return "git blob sha1", git_blob_sha1(path)


def _set_aside(path: Path) -> Path:
    """Move the cached blob behind a snapshot entry to ``BLOB.rejected`` and remove the entry."""
    blob = Path(os.path.realpath(path))
    rejected = blob.with_name(blob.name + ".rejected")
    os.replace(blob, rejected)
    if path.is_symlink() or path.exists():
        path.unlink()
    return rejected


class VerifiedStamps:
    """Which snapshot files were verified (size and mtime of the blob at the time): a second run skips hashing."""

    def __init__(self, folder: Path, repo_id: str, commit: str):
        self.path = folder / "hub" / f"{repo_id.replace('/', '--')}@{commit}.json"
        try:
            self.data: dict[str, dict] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}

    @staticmethod
    def _key(path: Path, spec: FileSpec) -> dict:
        st = path.stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": spec.sha256, "git_sha1": spec.git_sha1}

    def current(self, path: Path, spec: FileSpec) -> bool:
        return path.is_file() and self.data.get(spec.name) == self._key(path, spec)

    def add(self, path: Path, spec: FileSpec) -> None:
        self.data[spec.name] = self._key(path, spec)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path)


def verify_snapshot(repo: HubRepo, snapshot: Path, stamps_dir: Path, commit: str) -> tuple[int, list[str]]:
    """Check every recorded file of ``snapshot``; (bytes, unverified files present). A failure is set aside."""
    stamps = VerifiedStamps(stamps_dir, repo.repo_id, commit)
    total = 0
    for name, spec in repo.files.items():
        path = snapshot / name
        if not path.is_file():
            raise DownloadError(f"{repo.repo_id}: {name} is missing from the snapshot {snapshot}")
        size = path.stat().st_size
        if not stamps.current(path, spec):
            why = None
            if spec.size is not None and size != spec.size:
                why = f"size {size} bytes, the recorded size is {spec.size}"
            elif spec.has_digest:
                kind, got = _digest_of(path, spec)
                want = spec.sha256 or spec.git_sha1
                if got != want:
                    why = f"{kind} {got[:16]}... does not match the recorded {want[:16]}..."
            if why:
                stamps.save()
                rejected = _set_aside(path)
                raise DownloadError(f"{repo.repo_id}: {name}: {why}; kept aside as {rejected}, not used; "
                                    "check HF_ENDPOINT and run the same command again")
            stamps.add(path, spec)
        total += size
    stamps.save()
    extra = [p for p in repo.unverified if (snapshot / p).is_file()]
    return total + sum((snapshot / p).stat().st_size for p in extra), extra


def cached_snapshot(repo: HubRepo, cache_dir: str | Path | None, refs: tuple[str, ...] = ()) -> Path | None:
    """The complete cached snapshot of the pinned commit, or of what ``refs`` point at (a pin that was not
    found: main was fetched instead), without network; None when there is none."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    tried = [repo.revision] + [c for r in refs if (c := read_ref(repo.repo_id, r, cache_dir)) and c != repo.revision]
    for revision in tried:
        try:
            return Path(snapshot_download(repo.repo_id, revision=revision, allow_patterns=repo.allow_patterns,
                                          cache_dir=cache_dir, local_files_only=True))
        except (OSError, HfHubHTTPError, ValueError):  # not cached, incomplete (IncompleteSnapshotError), no tree
            continue
    return None


def _hub_error(repo: HubRepo, err: Exception) -> Exception:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    if isinstance(err, GatedRepoError):
        return DownloadError(f"{repo.repo_id}: gated or private; log in (`hf auth login`) or set HF_TOKEN ({first})")
    if isinstance(err, RepositoryNotFoundError):
        return DownloadError(f"{repo.repo_id}: repository not found at the hub ({first}); check HF_ENDPOINT, "
                             "or log in if it is private")
    if isinstance(err, RevisionNotFoundError):
        return DownloadError(f"{repo.repo_id}: revision {repo.revision} not found ({first})")
    return TransientDownloadError(f"{repo.repo_id}: {type(err).__name__}: {first}; run the same command again")


def _download(repo: HubRepo, revision: str, cache_dir, token, endpoint, policy: RetryPolicy,
              sleep: Callable[[float], None]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    permanent = (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError)
    last: Exception | None = None
    for attempt in range(policy.attempts):
        if attempt:
            sleep(policy.wait(attempt))
        try:
            return Path(snapshot_download(repo.repo_id, revision=revision, allow_patterns=repo.allow_patterns,
                                          cache_dir=cache_dir, token=token, endpoint=endpoint))
        except permanent:
            raise
        except (HfHubHTTPError, OSError) as err:  # connection, 5xx, timeouts: huggingface_hub's own retries ran out
            last = err
            print(f"{repo.repo_id}: {type(err).__name__}; "
                  f"{'retrying' if attempt + 1 < policy.attempts else 'giving up'}", file=sys.stderr)
    assert last is not None
    raise last


def fetch_repo(repo: HubRepo, *, refs: tuple[str, ...] = ("main",), cache_dir: str | Path | None = None,
               stamps_dir: Path, token: str | None = None, endpoint: str | None = None, progress: bool = True,
               policy: RetryPolicy | None = None, sleep: Callable[[float], None] = time.sleep) -> RepoResult:
    """The pinned commit of ``repo`` in the hub cache, every recorded file verified, ``refs`` pointing at it.

    ``endpoint``: default HF_ENDPOINT as huggingface_hub read it at import."""
    from huggingface_hub.errors import RevisionNotFoundError

    policy = policy or RetryPolicy()
    if not progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    notes: list[str] = []
    snapshot = cached_snapshot(repo, cache_dir, tuple(r for r in refs if not COMMIT.match(r)))
    downloaded = snapshot is None
    if snapshot is None:
        if offline():
            raise UserError(f"{repo.repo_id}: not complete in the Hugging Face cache ({hub_cache_dir(cache_dir)}) "
                            "and HF_HUB_OFFLINE is set; unset it to download")
        try:
            snapshot = _download(repo, repo.revision, cache_dir, token, endpoint, policy, sleep)
        except RevisionNotFoundError:
            # The pin came from third parties; the digests still decide what is accepted.
            notes.append(f"pinned commit {repo.revision[:12]} not found; fetched main and checked every digest")
            try:
                snapshot = _download(repo, "main", cache_dir, token, endpoint, policy, sleep)
            except Exception as err:  # noqa: BLE001 - one line for whatever the hub answered
                raise _hub_error(repo, err) from None
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001
            raise _hub_error(repo, err) from None
    commit = snapshot.name
    size, unverified = verify_snapshot(repo, snapshot, stamps_dir, commit)
    for ref in refs:
        if COMMIT.match(ref):
            if ref != commit:
                raise UserError(f"{repo.repo_id}: the config pins revision {ref}, models fetch fetched {commit}; "
                                "set models.revision=main or edit the manifest")
            continue
        before = write_ref(repo.repo_id, ref, commit, cache_dir)
        if before:
            notes.append(f"refs/{ref} moved from {before[:12]} to the verified {commit[:12]}")
    return RepoResult(repo.repo_id, commit, snapshot, downloaded, size, unverified, notes)
