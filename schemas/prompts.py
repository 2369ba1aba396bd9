"""The prompt table contract (DESIGN.md section 2): the known columns and their types, row statuses.

Row-level problems give the row the status ``invalid_input`` and an error message; the run goes on. Reading
the files (and their file-level errors) is ``pipeline/io/prompt_files.py``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

PROMPTS_SCHEMA_VERSION = 2  # 2: benchmark_index, template
# benchmark_index: the prompt's line (0-based) in its T2I-CompBench list; template: a template
# prompt of a train list (GORS's index < 560 rule), which selects {category}_template thresholds.
KNOWN_COLUMNS = {"prompt": pa.string(), "prompt_id": pa.string(), "category": pa.string(),
                 "seed": pa.int64(), "num_samples": pa.int32(), "benchmark_index": pa.int64(),
                 "template": pa.bool_()}
MAX_SAMPLES_PER_PROMPT = 99  # the sample index has two digits in the key
INT64_MAX = 2**63 - 1  # the sidecar's seed column: seed + sample index must fit
_BOM = "\ufeff"

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


def _finite(value: Any) -> Any:
    """NaN and infinities become null: standard JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_safe(value: Any) -> Any:
    value = _finite(value)
    try:
        json.dumps(value, allow_nan=False)
        return value
    except (TypeError, ValueError):
        return str(value)


def _strip_bom(text: Any) -> Any:
    return text[1:] if isinstance(text, str) and text.startswith(_BOM) else text


def _default_ids(tables: list[pa.Table]) -> dict[int, str]:
    """Ids of rows with a null ``prompt_id``: the row number, made unique against explicit ids."""
    explicit: set[str] = set()
    nulls: list[int] = []
    index = 0
    for table in tables:
        ids = table.column("prompt_id").to_pylist() if "prompt_id" in table.column_names else [None] * table.num_rows
        for pid in ids:
            if pid is None:
                nulls.append(index)
            else:
                explicit.add(_strip_bom(pid))
            index += 1
    out: dict[int, str] = {}
    for row in nulls:
        pid, n = str(row), 1
        while pid in explicit:  # an explicit id that reads like a row number keeps its text
            pid, n = f"{row}#{n}", n + 1
        explicit.add(pid)
        out[row] = pid
    return out


def default_id_count(tables: list[pa.Table]) -> int:
    """Rows whose prompt_id is null (or absent): their id is the row number."""
    return sum(t.column("prompt_id").null_count if "prompt_id" in t.column_names else t.num_rows for t in tables)


def validate_rows(
    tables: list[pa.Table], default_samples: int, max_prompt_chars: int, max_id_chars: int, target_attempts: int = 0,
) -> list[PromptRow]:
    """One PromptRow per input row, in planned order, with a status for each. ``target_attempts``: with
    accept-until-target, the attempts a prompt may reach (``job.max_samples_per_prompt``) whatever its
    ``num_samples``: the seed check covers the largest sample index the run can make."""
    rows: list[PromptRow] = []
    first_seen: dict[str, int] = {}
    defaults = _default_ids(tables)
    for table in tables:
        for rec in table.to_pylist():
            index = len(rows)
            pid = rec.get("prompt_id")
            pid = defaults[index] if pid is None else _strip_bom(pid)
            num = rec.get("num_samples")
            row = PromptRow(
                row=index, prompt=_strip_bom(rec.get("prompt")), prompt_id=pid, category=rec.get("category"),
                seed=rec.get("seed"), num_samples=default_samples if num is None else int(num),
                extra={k: _json_safe(v) for k, v in rec.items() if k not in KNOWN_COLUMNS},
                benchmark_index=rec.get("benchmark_index"), template=bool(rec.get("template")),
            )
            row.error = (_row_problem(row.prompt, max_prompt_chars) or _id_problem(pid, first_seen, max_id_chars)
                         or _samples_problem(row, target_attempts))
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


def _samples_problem(row: PromptRow, target_attempts: int = 0) -> str | None:
    if not 1 <= row.num_samples <= MAX_SAMPLES_PER_PROMPT:
        return f"num_samples must be between 1 and {MAX_SAMPLES_PER_PROMPT}, got {row.num_samples}"
    last = (target_attempts or row.num_samples) - 1  # the largest sample index this row can reach
    if row.seed is not None and row.seed + last > INT64_MAX:
        return f"seed {row.seed} plus sample index {last} does not fit int64 (max {INT64_MAX})"
    return None


def samples_of(row: PromptRow) -> int:
    """Samples a row contributes to the output: invalid rows get one record carrying the status."""
    return row.num_samples if row.status == STATUS_OK else 1
