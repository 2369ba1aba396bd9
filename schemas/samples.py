"""One record per (prompt row, sample): the tar's ``KEY.json`` and the shard's Parquet sidecar row."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

SAMPLE_SCHEMA_VERSION = 5  # 2: benchmark_index, template; 3: score_seconds; 4: scorer, score_parts,
# generator, referee_scores, referee_skipped; 5: exit_reason, monitor_trace, best_iteration, monitor_seconds

ACCEPTED = "accepted"
REJECTED = "rejected"
FAILED = "failed"
INVALID_INPUT = "invalid_input"
STATUSES = (ACCEPTED, REJECTED, FAILED, INVALID_INPUT)

SHARD_DIGITS, ROW_DIGITS, SAMPLE_DIGITS = 6, 5, 2
MAX_SHARD_SIZE = 10**ROW_DIGITS - 1


def sample_key(shard: int, row_in_shard: int, sample: int) -> str:
    """Digits only, unique in the run and the same on every rerun."""
    if not (0 <= row_in_shard < 10**ROW_DIGITS and 0 <= sample < 10**SAMPLE_DIGITS and 0 <= shard < 10**SHARD_DIGITS):
        raise ValueError(f"key out of range: shard={shard} row={row_in_shard} sample={sample}")
    return f"{shard:0{SHARD_DIGITS}d}{row_in_shard:0{ROW_DIGITS}d}{sample:0{SAMPLE_DIGITS}d}"


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
    generator: str = "inversion"  # engine.generator that made the image: inversion | sd_sampling
    # With monitor.enabled (pipeline/engine/monitor.py); None / empty / 0 otherwise. `iterations` is what ran.
    exit_reason: str | None = None  # completed | early_exit | failed
    monitor_trace: list[dict[str, float]] = field(default_factory=list)  # {iteration: int, score: float} per check
    best_iteration: int | None = None  # monitor.best_iterate: referee iterations of the stored iterate
    monitor_seconds: float = 0.0  # of `seconds`, its share of the in-loop checks (decode + score)
    version: int = SAMPLE_SCHEMA_VERSION

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    ("extra", pa.string()),  # JSON of the input's extra columns
    ("generator", pa.string()),
    ("exit_reason", pa.string()),
    ("monitor_trace", pa.list_(_MONITOR_CHECK)),
    ("best_iteration", pa.int32()),
    ("monitor_seconds", pa.float64()),
    ("version", pa.int32()),
], metadata={"referee_synth_sample_schema": str(SAMPLE_SCHEMA_VERSION)})


def sidecar_table(records: list[SampleRecord]) -> pa.Table:
    import json

    cols: dict[str, list[Any]] = {name: [] for name in SIDECAR_SCHEMA.names}
    for rec in records:
        d = rec.to_json_dict()
        d["final_losses"] = list(d["final_losses"].items())
        d["score_parts"] = list(d["score_parts"].items())
        d["model_ids"] = list(d["model_ids"].items())
        d["referee_scores"] = list(d["referee_scores"].items())
        d["referee_skipped"] = list(d["referee_skipped"].items())
        d["extra"] = json.dumps(d["extra"], ensure_ascii=False)
        for name in cols:
            cols[name].append(d[name])
    return pa.table(cols, schema=SIDECAR_SCHEMA)
