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
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.errors import UserError


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it) for a local path or a URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        kwargs = {"endpoint_override": endpoint} if endpoint else {}
        if os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"):
            kwargs["region"] = os.environ.get("AWS_REGION") or os.environ["AWS_DEFAULT_REGION"]
        try:
            return pafs.S3FileSystem(**kwargs), uri[len("s3://"):].rstrip("/")
        except Exception as err:  # pyarrow raises plain ArrowInvalid/OSError for bad settings
            raise UserError(f"storage: cannot open {uri}: {str(err).splitlines()[0]}") from None
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as err:
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
# or only the first N tries in this process ("TEXT:N", a transient fault).
REFUSE_WRITES_ENV = "REFEREE_SYNTH_REFUSE_WRITES"
_refused: dict[str, int] = {}


def _maybe_refuse(path: str) -> None:
    spec = os.environ.get(REFUSE_WRITES_ENV)
    if not spec:
        return
    needle, _, times = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "", "")
    if needle not in path or (times and _refused.get(path, 0) >= int(times)):
        return
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
