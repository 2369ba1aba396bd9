"""The prompt table contract (DESIGN.md section 2): reading, file-level checks, row statuses.

File-level problems (missing path, not Parquet, no ``prompt`` column, a column of the wrong type)
raise ``UserError`` with one line naming the path. Row-level problems give the row the status
``invalid_input`` and an error message; the run goes on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import UserError
from pipeline.storage import filesystem_for

PROMPTS_SCHEMA_VERSION = 2  # 2: benchmark_index, template
# benchmark_index: the prompt's line (0-based) in its T2I-CompBench list; template: a template
# prompt of a train list (GORS's index < 560 rule), which selects {category}_template thresholds.
KNOWN_COLUMNS = {"prompt": pa.string(), "prompt_id": pa.string(), "category": pa.string(),
                 "seed": pa.int64(), "num_samples": pa.int32(), "benchmark_index": pa.int64(),
                 "template": pa.bool_()}
MAX_SAMPLES_PER_PROMPT = 99  # the sample index has two digits in the key

STATUS_OK = "ok"
STATUS_INVALID = "invalid_input"


@dataclass
class PromptRow:
    row: int  # index in the planned (sorted-file) order, unique in the run
    prompt: str | None
    prompt_id: str
    category: str | None
    seed: int | None
    num_samples: int
    extra: dict[str, Any] = field(default_factory=dict)
    benchmark_index: int | None = None
    template: bool = False
    status: str = STATUS_OK
    error: str | None = None


@dataclass
class InputFile:
    path: str
    size: int
    rows: int


def list_input_files(uri: str) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    """A Parquet file, or every ``*.parquet`` file under a folder, sorted by path."""
    fs, path = filesystem_for(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"prompts: {uri}: no such file or folder")
    if info.type == pafs.FileType.File:
        return fs, [info]
    selector = pafs.FileSelector(path, recursive=True)
    files = [f for f in fs.get_file_info(selector) if f.type == pafs.FileType.File and f.path.endswith(".parquet")]
    if not files:
        raise UserError(f"prompts: {uri}: folder holds no .parquet files")
    return fs, sorted(files, key=lambda f: f.path)


def _read_one(fs: pafs.FileSystem, info: pafs.FileInfo) -> pa.Table:
    try:
        with fs.open_input_file(info.path) as handle:
            table = pq.read_table(handle)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as err:
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise UserError(f"prompts: {info.path}: not a readable Parquet file ({reason})") from None
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
    fs, infos = list_input_files(uri)
    tables = [_read_one(fs, info) for info in infos]
    files = [InputFile(path=i.path, size=i.size, rows=t.num_rows) for i, t in zip(infos, tables)]
    return files, tables


def fingerprint(files: list[InputFile]) -> dict[str, Any]:
    return {
        "files": [{"path": f.path, "size": f.size, "rows": f.rows} for f in files],
        "total_rows": sum(f.rows for f in files),
    }


def _row_problem(prompt: Any, max_chars: int) -> str | None:
    if prompt is None:
        return "prompt is null"
    if prompt == "":
        return "prompt is empty"
    if not prompt.strip():
        return "prompt is whitespace only"
    if len(prompt) > max_chars:
        return f"prompt has {len(prompt)} characters, more than the limit of {max_chars}"
    return None


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def validate_rows(
    tables: list[pa.Table], default_samples: int, max_prompt_chars: int, max_id_chars: int
) -> list[PromptRow]:
    """One PromptRow per input row, in planned order, with a status for each."""
    rows: list[PromptRow] = []
    first_seen: dict[str, int] = {}
    for table in tables:
        for rec in table.to_pylist():
            index = len(rows)
            pid = rec.get("prompt_id")
            pid = str(index) if pid is None else pid
            num = rec.get("num_samples")
            row = PromptRow(
                row=index, prompt=rec.get("prompt"), prompt_id=pid, category=rec.get("category"),
                seed=rec.get("seed"), num_samples=default_samples if num is None else int(num),
                extra={k: _json_safe(v) for k, v in rec.items() if k not in KNOWN_COLUMNS},
                benchmark_index=rec.get("benchmark_index"), template=bool(rec.get("template")),
            )
            row.error = _row_problem(row.prompt, max_prompt_chars) or _id_problem(pid, first_seen, max_id_chars)
            if row.error is None and not 1 <= row.num_samples <= MAX_SAMPLES_PER_PROMPT:
                row.error = f"num_samples must be between 1 and {MAX_SAMPLES_PER_PROMPT}, got {row.num_samples}"
            if row.error:
                row.status = STATUS_INVALID
            first_seen.setdefault(pid, index)
            rows.append(row)
    return rows


def _id_problem(pid: str, first_seen: dict[str, int], max_chars: int) -> str | None:
    if not pid.strip():
        return "prompt_id is empty"
    if len(pid) > max_chars:
        return f"prompt_id has {len(pid)} characters, more than the limit of {max_chars}"
    if pid in first_seen:
        return f"duplicate prompt_id (first used by row {first_seen[pid]})"
    return None


def samples_of(row: PromptRow) -> int:
    """Samples a row contributes to the output: invalid rows get one record carrying the status."""
    return row.num_samples if row.status == STATUS_OK else 1
