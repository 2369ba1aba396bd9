"""One record per (prompt row, sample): the tar's ``KEY.json`` and the shard's Parquet sidecar row.

``SIDECAR_SCHEMA`` is the one declaration of the fields' types: the sidecar is written with it, every
``KEY.json`` is typed by it (one JSON type per field in every shard), and the dataset card's
``dataset_info.features`` are derived from it. A new field goes into ``SampleRecord`` and ``SIDECAR_SCHEMA``
(a test checks that the two agree), and nothing else.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

SAMPLE_SCHEMA_VERSION = 6  # 2: benchmark_index, template; 3: score_seconds; 4: scorer, score_parts,
# generator, referee_scores, referee_skipped; 5: night, exit_reason, monitor_trace, best_iteration, monitor_seconds;
# 6: stage

ACCEPTED = "accepted"
REJECTED = "rejected"
FAILED = "failed"
INVALID_INPUT = "invalid_input"
STATUSES = (ACCEPTED, REJECTED, FAILED, INVALID_INPUT)

SHARD_DIGITS, ROW_DIGITS, SAMPLE_DIGITS = 6, 5, 2
MAX_SHARD_SIZE = 10**ROW_DIGITS - 1


def sample_key(shard: int, row_in_shard: int, sample: int) -> str:
    """Digits only, unique in the run folder across nights and the same on every rerun: ``row_in_shard`` is
    the prompt's stable slot in its shard (pipeline/io/placement.py), never its position in tonight's table."""
    if not (0 <= row_in_shard < 10**ROW_DIGITS and 0 <= sample < 10**SAMPLE_DIGITS and 0 <= shard < 10**SHARD_DIGITS):
        raise ValueError(f"key out of range: shard={shard} row={row_in_shard} sample={sample}")
    return f"{shard:0{SHARD_DIGITS}d}{row_in_shard:0{ROW_DIGITS}d}{sample:0{SAMPLE_DIGITS}d}"


def key_shard(key: object) -> int | None:
    """The shard a sample key names (the inverse of ``sample_key``'s first part); None for no key of ours."""
    width = SHARD_DIGITS + ROW_DIGITS + SAMPLE_DIGITS
    if not isinstance(key, str) or len(key) != width or not key.isascii() or not key.isdigit():
        return None
    return int(key[:SHARD_DIGITS])


@dataclass
class SampleRecord:
    key: str
    shard: int
    row: int
    prompt_id: str
    prompt: str | None
    category: str | None
    sample_index: int
    seed: int | None
    status: str
    benchmark_index: int | None = None  # line in the T2I-CompBench list the prompt came from
    template: bool = False  # a benchmark template prompt: {category}_template threshold
    error: str | None = None
    vqa_score: float | None = None  # the judging score: BLIP-VQA's, or that of the scorer named in `scorer`
    vqa_questions: list[str] = field(default_factory=list)
    vqa_answers: list[float] = field(default_factory=list)
    threshold: float | None = None
    itm_score: float | None = None
    final_losses: dict[str, float] = field(default_factory=dict)
    iterations: int = 0
    config_hash: str = ""
    model_ids: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0  # device seconds: share of its optimisation batches + its own scoring
    score_seconds: float = 0.0  # of which encoding and scoring the stored image
    scorer: str | None = None  # which scorer judged it (scoring.by_category): blip_vqa, clipscore, ...
    score_parts: dict[str, float] = field(default_factory=dict)  # per scorer; 3-in-1's three parts
    # With zoo.referees (empty otherwise): per referee that judged the sample, its kind, final match score,
    # final loss and weight; per referee that gave it weight 0, why (category, unparsable prompt).
    referee_scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    referee_skipped: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    generator: str = "inversion"  # the generator that made the image: inversion | sd_sampling
    stage: int | None = None  # engine.generator cascade: the stage that made it (1 = cascade.stages[0]); else None
    night: int = 0  # the invocation of the run folder that made it (run.json history; 0: before history)
    # With monitor.enabled (pipeline/engine/monitor.py); None / empty / 0 otherwise. `iterations` is what ran.
    exit_reason: str | None = None  # completed | early_exit | failed
    monitor_trace: list[dict[str, float]] = field(default_factory=list)  # {iteration: int, score: float} per check
    best_iteration: int | None = None  # monitor.best_iterate: referee iterations of the stored iterate
    monitor_seconds: float = 0.0  # of `seconds`, its share of the in-loop checks (decode + score)
    version: int = SAMPLE_SCHEMA_VERSION

    def to_json_dict(self) -> dict[str, Any]:
        """``KEY.json``: every value as ``SIDECAR_SCHEMA`` types it (an int threshold is a float, a map an
        object, ``extra`` an object), non-finite floats as null, so readers that infer one schema from the
        first shard (``datasets``, pyarrow) agree with every later shard."""
        row = sidecar_table([self]).to_pylist()[0]
        return {f.name: _json_value(f, row[f.name]) for f in SIDECAR_SCHEMA}


JSON_TEXT = {"encoding": "json"}  # a sidecar string column that holds JSON; an object in KEY.json
_STR_MAP = pa.map_(pa.string(), pa.string())
_REFEREE_SCORE = pa.struct([("kind", pa.string()), ("score", pa.float64()), ("loss", pa.float64()),
                            ("weight", pa.float64())])
_MONITOR_CHECK = pa.struct([("iteration", pa.int32()), ("score", pa.float64())])
SIDECAR_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("shard", pa.int32()),
    ("row", pa.int64()),
    ("prompt_id", pa.string()),
    ("prompt", pa.string()),
    ("category", pa.string()),
    ("sample_index", pa.int32()),
    ("benchmark_index", pa.int64()),
    ("template", pa.bool_()),
    ("seed", pa.int64()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("vqa_score", pa.float64()),
    ("vqa_questions", pa.list_(pa.string())),
    ("vqa_answers", pa.list_(pa.float64())),
    ("threshold", pa.float64()),
    ("itm_score", pa.float64()),
    ("final_losses", pa.map_(pa.string(), pa.float64())),
    ("iterations", pa.int32()),
    ("config_hash", pa.string()),
    ("model_ids", _STR_MAP),
    ("seconds", pa.float64()),
    ("score_seconds", pa.float64()),
    ("scorer", pa.string()),
    ("score_parts", pa.map_(pa.string(), pa.float64())),
    ("referee_scores", pa.map_(pa.string(), _REFEREE_SCORE)),
    ("referee_skipped", _STR_MAP),
    pa.field("extra", pa.string(), metadata=JSON_TEXT),  # the input's extra columns (an object in KEY.json)
    ("generator", pa.string()),
    ("stage", pa.int32()),
    ("night", pa.int32()),
    ("exit_reason", pa.string()),
    ("monitor_trace", pa.list_(_MONITOR_CHECK)),
    ("best_iteration", pa.int32()),
    ("monitor_seconds", pa.float64()),
    ("version", pa.int32()),
], metadata={"referee_synth_sample_schema": str(SAMPLE_SCHEMA_VERSION)})


def _is_json_text(f: pa.Field) -> bool:
    return (f.metadata or {}).get(b"encoding") == b"json"


def sidecar_table(records: list[SampleRecord]) -> pa.Table:
    """The records as ``SIDECAR_SCHEMA`` types them (maps from dicts; JSON-text columns encoded here)."""
    rows = [asdict(rec) for rec in records]
    cols = {f.name: [json.dumps(r[f.name], ensure_ascii=False) if _is_json_text(f) else r[f.name] for r in rows]
            for f in SIDECAR_SCHEMA}
    return pa.table(cols, schema=SIDECAR_SCHEMA)


def _json_value(f: pa.Field | pa.DataType, value: Any) -> Any:
    """A sidecar value (``Table.to_pylist``) as ``KEY.json`` holds it."""
    t = f.type if isinstance(f, pa.Field) else f
    if value is None:
        return None
    if isinstance(f, pa.Field) and _is_json_text(f):
        return json.loads(value)
    if pa.types.is_map(t):
        return {k: _json_value(t.item_type, v) for k, v in value}
    if pa.types.is_list(t):
        return [_json_value(t.value_type, v) for v in value]
    if pa.types.is_struct(t):
        return {c.name: _json_value(c, value[c.name]) for c in t}
    if pa.types.is_floating(t) and not math.isfinite(value):
        return None  # JSON has no NaN; null is "no value", as for a sample no referee judged
    return value


# Arrow type -> the ``dtype`` the Hugging Face dataset card (``dataset_info.features``) writes for it.
_CARD_DTYPES = {pa.string(): "string", pa.bool_(): "bool", pa.int32(): "int32", pa.int64(): "int64",
                pa.float32(): "float32", pa.float64(): "float64"}


def _card_feature(f: pa.Field | pa.DataType) -> dict[str, Any]:
    t = f.type if isinstance(f, pa.Field) else f
    if pa.types.is_map(t) or (isinstance(f, pa.Field) and _is_json_text(f)):
        return {"dtype": "json"}  # keys differ by scorer, referee and input: an object, not a struct
    if pa.types.is_list(t):
        inner = _card_feature(t.value_type)
        return {"list": inner.get("dtype", inner.get("struct"))}
    if pa.types.is_struct(t):
        return {"struct": [{"name": c.name, **_card_feature(c)} for c in t]}
    if t not in _CARD_DTYPES:
        raise TypeError(f"sidecar field {getattr(f, 'name', t)}: no dataset-card dtype for {t}")
    return {"dtype": _CARD_DTYPES[t]}


def card_features(image_format: str) -> list[dict[str, Any]]:
    """``dataset_info.features`` of a run folder's card: the WebDataset columns a reader of ``shards/*.tar``
    gets (image, caption, ``KEY.json``, key, url), the JSON's from ``SIDECAR_SCHEMA``."""
    meta = [{"name": f.name, **_card_feature(f)} for f in SIDECAR_SCHEMA]
    return [{"name": image_format, "dtype": "image"}, {"name": "txt", "dtype": "string"},
            {"name": "json", "struct": meta}, {"name": "__key__", "dtype": "string"},
            {"name": "__url__", "dtype": "string"}]
