"""Output and input file systems through ``pyarrow.fs``: local paths, ``s3://``, ``gs://``, ``hdfs://``.

S3 honours the standard AWS settings, ``AWS_ENDPOINT_URL`` included, so MinIO, Ceph and test
servers need no code change. Files appear under their final name only when complete: locally by
writing a temporary name and renaming; on an object store an upload becomes visible only when
it is closed.
"""

from __future__ import annotations

import errno
import os
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipeline.config import JobConfig
from pipeline.errors import UserError

# Timeouts and retries for object stores (job.storage_* in the config); the job's config replaces
# the defaults through configure().
_TIMEOUTS = JobConfig()


def configure(job: JobConfig) -> None:
    global _TIMEOUTS
    _TIMEOUTS = job


def _s3(uri: str) -> pafs.FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {"endpoint_override": endpoint} if endpoint else {}
    if os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"):
        kwargs["region"] = os.environ.get("AWS_REGION") or os.environ["AWS_DEFAULT_REGION"]
    return pafs.S3FileSystem(
        connect_timeout=_TIMEOUTS.storage_connect_timeout_s, request_timeout=_TIMEOUTS.storage_request_timeout_s,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=_TIMEOUTS.storage_max_attempts), **kwargs,
    )


def _gcs(uri: str) -> tuple[pafs.FileSystem, str]:
    # Without a limit the GCS client retries for 15 minutes (a missing bucket, no credentials).
    _, path = pafs.FileSystem.from_uri(uri)
    limit = timedelta(seconds=_TIMEOUTS.storage_retry_time_s)
    return pafs.GcsFileSystem(retry_time_limit=limit), path


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it) for a local path or a URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    try:
        if uri.startswith("s3://"):
            return _s3(uri), uri[len("s3://"):].rstrip("/")
        fs, path = _gcs(uri) if uri.startswith(("gs://", "gcs://")) else pafs.FileSystem.from_uri(uri)
    except Exception as err:  # pyarrow raises plain ArrowInvalid/OSError for bad settings
        raise UserError(f"storage: cannot open {uri}: {str(err).splitlines()[0]}") from None
    return fs, path.rstrip("/")


def is_local(fs: pafs.FileSystem) -> bool:
    return fs.type_name == "local"


def join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def file_size(fs: pafs.FileSystem, path: str) -> int | None:
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that ``path`` never shows a partial file."""
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    _maybe_refuse(path)
    if not is_local(fs):
        with fs.open_output_stream(path) as out:  # object stores publish on close
            out.write(data)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        os.replace(tmp, path)  # atomic on POSIX
    finally:
        if exists(fs, tmp):
            fs.delete_file(tmp)


# Debug hook for fault tests, off unless set: writes whose path contains TEXT are refused ("TEXT"),
# or only the first N tries in this process ("TEXT:N", a transient fault); several faults: "TEXT:N,OTHER".
REFUSE_WRITES_ENV = "REFEREE_SYNTH_REFUSE_WRITES"
_refused: dict[str, int] = {}


def _maybe_refuse(path: str) -> None:
    for spec in filter(None, os.environ.get(REFUSE_WRITES_ENV, "").split(",")):
        needle, _, times = spec.rpartition(":")
        if not times.isdigit():  # no count: the whole spec is the text
            needle, times = spec, ""
        if needle not in path or (times and _refused.get(path, 0) >= int(times)):
            continue
        _refused[path] = _refused.get(path, 0) + 1
        raise OSError(errno.EACCES, f"injected: write refused for {path}")


def upload_file_atomic(fs: pafs.FileSystem, local_file: str, path: str) -> None:
    """Copy a finished local file to ``path`` atomically (rename locally, single upload remotely)."""
    _maybe_refuse(path)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            pafs.copy_files(local_file, tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
            os.replace(tmp, path)
        finally:
            if exists(fs, tmp):
                fs.delete_file(tmp)
        return
    pafs.copy_files(local_file, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as handle:
        return handle.read()
