"""Plain-URL downloads that never leave a half file under the final name.

A file is streamed to ``NAME.part`` with a progress bar (size and rate); a dropped connection, a
timeout or a 5xx (also 408, 429) is retried with exponential backoff, resuming from the bytes already
there (HTTP ``Range``), a bounded number of times; a later run resumes the same way. Only when the size
and the sha256 match what the project records is ``NAME.part`` renamed to ``NAME``; a mismatch is moved
aside to ``NAME.rejected`` and never used. A file without a recorded digest is checked against the
server's size and its sha256 is recorded in ``NAME.verified.json`` on first download (trust on first
use): from then on it must match that. The stamp (size, mtime, sha256) also lets a second run skip
re-hashing a file nobody touched. Plain stdlib HTTP: proxies come from the usual ``https_proxy``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.models.manifest import FileSpec

PART_SUFFIX = ".part"
REJECTED_SUFFIX = ".rejected"
STAMP_SUFFIX = ".verified.json"
CHUNK_BYTES = 1 << 20
HASH_CHUNK_BYTES = 8 << 20
RETRY_STATUSES = {408, 429}  # besides every 5xx
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


class DownloadError(UserError):
    """A download that cannot finish or verify; the message is one line that says what to do."""


class TransientDownloadError(DownloadError):
    """Retries ran out on connection errors or 5xx: running the same command again resumes."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # requests per file per run, the first one included
    backoff_s: float = 1.0  # wait before retry k: backoff_s * 2**(k-1), at most backoff_max_s
    backoff_max_s: float = 30.0
    timeout_s: float = 60.0  # connect and per-read socket timeout

    def wait(self, retry: int) -> float:
        return min(self.backoff_s * 2 ** (retry - 1), self.backoff_max_s)


@dataclass(frozen=True)
class Fetched:
    path: Path
    size: int
    sha256: str
    downloaded: bool  # False: already there and verified
    trusted_on_first_use: bool  # no recorded digest: this run's sha256 is now the recorded one


class _Retry(Exception):
    """A failure worth another request (connection, timeout, 5xx, short body)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The git blob id of a file (what the hub reports for small, non-LFS files)."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def stamp_path(final: Path) -> Path:
    return final.with_name(final.name + STAMP_SUFFIX)


def read_stamp(final: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(stamp_path(final).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("sha256"), str) else None


def _write_stamp(final: Path, sha256: str, url: str, trusted: bool) -> None:
    st = final.stat()
    record = {"name": final.name, "size": st.st_size, "sha256": sha256, "mtime_ns": st.st_mtime_ns,
              "url": url, "digest_source": "trust on first use" if trusted else "recorded",
              "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = stamp_path(final).with_name(stamp_path(final).name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, stamp_path(final))


def expected_sha256(spec: FileSpec, final: Path) -> tuple[str | None, bool]:
    """(digest to match, whether it is a trust-on-first-use record rather than the project's)."""
    if spec.sha256:
        return spec.sha256, False
    stamp = read_stamp(final)
    return (stamp["sha256"], True) if stamp else (None, True)


def stamp_is_current(spec: FileSpec, final: Path) -> bool:
    """The file is the one verified before: same size and mtime as its stamp, and the stamp agrees with spec."""
    stamp = read_stamp(final)
    if stamp is None or not final.is_file():
        return False
    st = final.stat()
    return (stamp.get("size") == st.st_size and stamp.get("mtime_ns") == st.st_mtime_ns
            and spec.size in (None, st.st_size) and spec.sha256 in (None, stamp["sha256"]))


def set_aside(path: Path, final: Path) -> Path:
    """Move a file that failed verification to ``NAME.rejected`` (replacing an older one): kept, never used."""
    rejected = final.with_name(final.name + REJECTED_SUFFIX)
    os.replace(path, rejected)
    return rejected


def _mismatch(spec: FileSpec, size: int, sha: str, want_sha: str | None, tofu: bool) -> str | None:
    if spec.size is not None and size != spec.size:
        return f"size {size} bytes, the recorded size is {spec.size}"
    if want_sha and sha != want_sha:
        whose = "the sha256 recorded on its first download" if tofu else "the recorded sha256"
        return f"sha256 {sha[:16]}... does not match {whose} {want_sha[:16]}..."
    return None


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, full size) of a Content-Range header; None where absent or '*'."""
    m = _CONTENT_RANGE.match(value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(3)) if m.group(3) != "*" else None
    return start, total


class _Downloader:
    def __init__(self, spec: FileSpec, url: str, final: Path, policy: RetryPolicy, progress: bool):
        self.spec, self.url, self.final, self.policy, self.progress = spec, url, final, policy, progress
        self.part = final.with_name(final.name + PART_SUFFIX)
        self.total: int | None = spec.size

    def _open(self, offset: int) -> Any:
        headers = {"User-Agent": "referee-synth", "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            return urllib.request.urlopen(urllib.request.Request(self.url, headers=headers),
                                          timeout=self.policy.timeout_s)
        except urllib.error.HTTPError as err:
            err.close()
            if err.code == 416 and offset:  # nothing past `offset`: complete, or longer than the file
                _, total = _content_range(err.headers.get("Content-Range"))
                if total == offset:
                    self.total = total
                    return None
                self.part.unlink(missing_ok=True)
                raise _Retry(f"HTTP 416 for bytes {offset}- (the partial file is longer than the server's)") from None
            if err.code >= 500 or err.code in RETRY_STATUSES:
                raise _Retry(f"HTTP {err.code} {err.reason}") from None
            raise DownloadError(f"{self.spec.name}: HTTP {err.code} {err.reason} from {self.url}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", None) or err
            raise _Retry(f"{type(err).__name__}: {reason}") from None

    def _size_of(self, resp: Any, offset: int) -> int | None:
        length = resp.headers.get("Content-Length")
        if resp.status == 206:
            _, total = _content_range(resp.headers.get("Content-Range"))
            if total is not None:
                return total
        return offset + int(length) if length and length.isdigit() else None

    def _stream(self, resp: Any, offset: int) -> None:
        from tqdm import tqdm

        with resp, open(self.part, "ab" if offset else "wb") as out, tqdm(
            total=self.total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=self.spec.name, disable=not self.progress, file=sys.stderr, leave=True,
        ) as bar:
            try:
                while chunk := resp.read(CHUNK_BYTES):
                    out.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as err:  # dropped mid-body: resume from what is written
                raise _Retry(f"connection lost after {out.tell()} bytes ({type(err).__name__})") from None
            written = out.tell()
        if self.total is not None and written < self.total:
            raise _Retry(f"connection closed after {written} of {self.total} bytes")

    def _one_request(self) -> None:
        offset = self.part.stat().st_size if self.part.exists() else 0
        if self.total is not None and offset > self.total:
            self.part.unlink()
            offset = 0
        if self.total is not None and offset == self.total:
            return
        resp = self._open(offset)
        if resp is None:
            return
        start, _ = _content_range(resp.headers.get("Content-Range"))
        if resp.status != 206 or start != offset:
            offset = 0  # the server ignored the range: start over
        size = self._size_of(resp, offset)
        if size is not None and self.spec.size is not None and size != self.spec.size:
            resp.close()
            raise DownloadError(
                f"{self.spec.name}: the server at {self.url} offers {size} bytes, the recorded size is "
                f"{self.spec.size}; check the base URL (--base-url / REFEREE_SYNTH_MODELS_URL)"
            )
        self.total = size if size is not None else self.total
        self._stream(resp, offset)

    def run(self, sleep: Callable[[float], None]) -> None:
        last = ""
        for attempt in range(self.policy.attempts):
            if attempt:
                sleep(self.policy.wait(attempt))
            try:
                self._one_request()
                return
            except _Retry as err:
                last = str(err)
                print(f"{self.spec.name}: {last}; "
                      f"{'retrying' if attempt + 1 < self.policy.attempts else 'giving up'}", file=sys.stderr)
        kept = f"; {self.part.stat().st_size} bytes are kept in {self.part}" if self.part.exists() else ""
        raise TransientDownloadError(
            f"{self.spec.name}: gave up after {self.policy.attempts} attempts ({last}) from {self.url}{kept}; "
            "run the same command again to resume"
        )


def fetch_file(spec: FileSpec, url: str, folder: Path, *, policy: RetryPolicy | None = None, progress: bool = True,
               sleep: Callable[[float], None] = time.sleep) -> Fetched:
    """``folder/spec.name``, downloaded from ``url`` unless already there and verified."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / spec.name
    want_sha, tofu = expected_sha256(spec, final)
    if final.is_file():
        if stamp_is_current(spec, final):
            stamp = read_stamp(final)
            return Fetched(final, final.stat().st_size, stamp["sha256"], False, False)
        size, sha = final.stat().st_size, sha256_file(final)
        if _mismatch(spec, size, sha, want_sha, tofu) is None:  # placed by hand, or the stamp was lost
            _write_stamp(final, sha, url, trusted=want_sha is None or tofu)
            return Fetched(final, size, sha, False, want_sha is None)
        rejected = set_aside(final, final)
        print(f"{spec.name}: the file in place fails verification; moved aside to {rejected.name}", file=sys.stderr)
    _Downloader(spec, url, final, policy or RetryPolicy(), progress).run(sleep)
    part = final.with_name(final.name + PART_SUFFIX)
    size, sha = part.stat().st_size, sha256_file(part)
    why = _mismatch(spec, size, sha, want_sha, tofu)
    if why is not None:
        rejected = set_aside(part, final)
        raise DownloadError(f"{spec.name}: {why}; the download is kept aside as {rejected}, nothing was installed")
    os.replace(part, final)
    _write_stamp(final, sha, url, trusted=want_sha is None or tofu)
    return Fetched(final, size, sha, True, want_sha is None)
