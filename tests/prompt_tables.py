"""Prompt tables for the tests of the prompt contract and of reading the prompt files."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io.prompt_files import read_prompt_tables
from schemas.prompts import PromptRow, validate_rows


def write_prompts(path, **cols) -> str:
    """A Parquet file with these columns; its path as text."""
    pq.write_table(pa.table(cols), path)
    return str(path)


def read_rows(path: str, samples: int = 2) -> list[PromptRow]:
    """The rows of a file or folder as the job validates them (small limits: 50 prompt, 8 id characters)."""
    _, tables = read_prompt_tables(path)
    return validate_rows(tables, samples, max_prompt_chars=50, max_id_chars=8)
