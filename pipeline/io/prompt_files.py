"""The prompt table's files (DESIGN.md section 2): listing a file or folder on any storage, reading each
Parquet file with its hive partition columns, conforming the known columns to the contract's types, and the
fingerprint a resume must match.

File-level problems (missing path, not Parquet, no ``prompt`` column, a column of the wrong type) raise
``UserError`` with one line naming the path. What a row must hold is the contract's: ``schemas/prompts.py``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline.io.storage import filesystem_for
from schemas.prompts import KNOWN_COLUMNS

# Hive's name for a null partition value (Spark, Hive and pyarrow write it).
_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"


@dataclass
class InputFile:
    path: str
    size: int
    rows: int
    partitions: dict[str, str | None] = field(default_factory=dict)  # hive key=value folders above it


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _interruptible(call: Callable[[], Any]) -> Any:
    """Run a blocking object-store call in a daemon thread: Ctrl-C stops the job at once instead of
    after the store's retries (pyarrow does not check signals inside them)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as err:  # handed to the caller's thread
            box["error"] = err

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if "error" in box:
        raise box["error"]
    return box["value"]


def _info(fs: pafs.FileSystem, path: str, uri: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path) if fs.type_name == "local" else _interruptible(lambda: fs.get_file_info(path))
    except OSError as err:  # a missing bucket, refused credentials, a timeout: one line
        raise UserError(f"prompts: {uri}: cannot read ({_first_line(err)})") from None


def _ignored(name: str) -> bool:
    """Hidden and ``_``-prefixed names (``_SUCCESS``, ``.tmp-*``), as pyarrow datasets ignore them."""
    return name.startswith((".", "_"))


def _walk_local(root: str, uri: str) -> list[pafs.FileInfo]:
    """Parquet files under a local folder: symlinked folders followed once (a loop ends), each real
    file listed once (the first path in sorted order), run folders refused."""
    seen_dirs: set[str] = set()
    by_real: dict[str, list[str]] = {}
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add(real)
        if "run.json" in names:
            raise UserError(f"prompts: {uri}: holds a run folder ({folder}); its sidecars are not prompts: "
                            "point --prompts at the prompt files only")
        dirs[:] = sorted(d for d in dirs if not _ignored(d))
        for name in names:
            if name.endswith(".parquet") and not _ignored(name):
                path = os.path.join(folder, name)
                by_real.setdefault(os.path.realpath(path), []).append(path)
    paths = sorted(min(found) for found in by_real.values())
    return [pafs.LocalFileSystem().get_file_info(p) for p in paths]


def list_input_files(uri: str) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    """A Parquet file, or every ``*.parquet`` file under a folder, sorted by path."""
    if not uri.strip():
        raise UserError("prompts: the path is empty")
    fs, path = filesystem_for(uri)
    info = _info(fs, path, uri)
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"prompts: {uri}: no such file or folder")
    if info.type == pafs.FileType.File:
        return fs, [info]
    if fs.type_name == "local":
        files = _walk_local(path, uri)
    else:
        try:
            found = _interruptible(lambda: fs.get_file_info(pafs.FileSelector(path, recursive=True)))
        except OSError as err:
            raise UserError(f"prompts: {uri}: cannot list ({_first_line(err)})") from None
        rel = len(path.rstrip("/")) + 1
        if any(f.path.endswith("/run.json") for f in found):
            raise UserError(f"prompts: {uri}: holds a run folder; its sidecars are not prompts: "
                            "point --prompts at the prompt files only")
        files = [f for f in found if f.type == pafs.FileType.File and f.path.endswith(".parquet")
                 and not any(_ignored(part) for part in f.path[rel:].split("/"))]
    if not files:
        raise UserError(f"prompts: {uri}: folder holds no .parquet files")
    return fs, sorted(files, key=lambda f: f.path)


def hive_partitions(root: str, file_path: str) -> dict[str, str | None]:
    """``key=value`` folder names between the prompts folder and the file (hive partitioning)."""
    rel = file_path[len(root.rstrip("/")) + 1:] if file_path.startswith(root.rstrip("/") + "/") else ""
    parts: dict[str, str | None] = {}
    for segment in rel.split("/")[:-1]:
        key, eq, value = segment.partition("=")
        if eq and key:
            value = unquote(value)
            parts[unquote(key)] = None if value == _HIVE_NULL else value
    return parts


def _add_partitions(table: pa.Table, parts: dict[str, str | None], path: str) -> pa.Table:
    """The partition values as columns (typed as the contract says for known ones)."""
    for name, value in parts.items():
        if name in table.column_names:
            raise UserError(f"prompts: {path}: column '{name}' is both in the file and a hive partition folder")
        typ = KNOWN_COLUMNS.get(name, pa.string())
        try:
            col = pa.array([value] * table.num_rows, pa.string()).cast(typ)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise UserError(f"prompts: {path}: hive partition {name}={value} does not fit {typ}") from None
        table = table.append_column(name, col)
    return table


def _read_one(fs: pafs.FileSystem, info: pafs.FileInfo, parts: dict[str, str | None]) -> pa.Table:
    try:
        with fs.open_input_file(info.path) as handle:
            table = pq.read_table(handle)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as err:
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise UserError(f"prompts: {info.path}: not a readable Parquet file ({reason})") from None
    table = _add_partitions(table, parts, info.path)
    if "prompt" not in table.column_names:
        cols = ", ".join(table.column_names) or "none"
        raise UserError(f"prompts: {info.path}: no 'prompt' column (columns: {cols})")
    return _conform(table, info.path)


def _castable(src: pa.DataType, dst: pa.DataType, name: str) -> bool:
    if pa.types.is_null(src):
        return True
    if pa.types.is_integer(dst):
        return pa.types.is_integer(src)
    if pa.types.is_boolean(dst):
        return pa.types.is_boolean(src)
    is_text = pa.types.is_string(src) or pa.types.is_large_string(src)
    # Integer ids are common and unambiguous as text; an integer prompt is not a prompt.
    return is_text or (name == "prompt_id" and pa.types.is_integer(src))


def _conform(table: pa.Table, path: str) -> pa.Table:
    """Cast known columns to their contract types; a column that cannot be cast is a file error."""
    for name, typ in KNOWN_COLUMNS.items():
        if name not in table.column_names or table.column(name).type == typ:
            continue
        col = table.column(name)
        if not _castable(col.type, typ, name):
            raise UserError(f"prompts: {path}: column '{name}' must be {typ}, got {col.type}")
        try:
            table = table.set_column(table.column_names.index(name), name, col.cast(typ))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise UserError(f"prompts: {path}: column '{name}' does not fit {typ}") from None
    return table


def read_prompt_tables(uri: str) -> tuple[list[InputFile], list[pa.Table]]:
    """Every input file's table, with hive partition folders (``category=color/``) read as columns."""
    fs, infos = list_input_files(uri)
    root = filesystem_for(uri)[1]
    parts = [hive_partitions(root, i.path) for i in infos]
    tables = [_read_one(fs, info, part) for info, part in zip(infos, parts)]
    files = [InputFile(path=i.path, size=i.size, rows=t.num_rows, partitions=p)
             for i, t, p in zip(infos, tables, parts)]
    return files, tables


def content_hash(tables: list[pa.Table]) -> str:
    """SHA-256 of the tables' data in planned order: an edited prompt changes it, a moved file not."""
    digest = hashlib.sha256()
    for table in tables:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.combine_chunks())
        digest.update(hashlib.sha256(sink.getvalue().to_pybytes()).digest())
    return digest.hexdigest()


def fingerprint(files: list[InputFile], tables: list[pa.Table]) -> dict[str, Any]:
    """What a resume must match: the content hash (files, sizes and rows are recorded for people)."""
    return {
        "content_sha256": content_hash(tables),
        "files": [{"path": f.path, "size": f.size, "rows": f.rows} for f in files],
        "total_rows": sum(f.rows for f in files),
    }
