"""The run folder's JSON files: ``run.json``, per-shard stats markers, ``summary.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

RUN_SCHEMA_VERSION = 1
STATS_SCHEMA_VERSION = 1
SUMMARY_SCHEMA_VERSION = 1


@dataclass
class JsonRecord:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SampleCounts(JsonRecord):
    """Rows read and samples by status: per shard in its marker, per run in the summary."""

    rows: int
    samples: int
    accepted: int
    rejected: int
    failed: int
    invalid_input: int


COUNT_FIELDS = tuple(f.name for f in fields(SampleCounts))


@dataclass
class ShardStats(SampleCounts):
    """Written last for each shard: its presence means the shard is complete."""

    shard: int
    seconds: float
    config_hash: str
    tar_bytes: int
    parquet_bytes: int
    finished_at: str
    rejected_tar_bytes: int = 0  # 0: no rejected-images tar for this shard
    # Device time and acceptance (pipeline/budget/accounting.py): the sum of the samples' seconds, per
    # category {prompts, samples, accepted, rejected, failed, seconds}, prompts short of the target.
    device_seconds: float = 0.0
    categories: dict[str, dict[str, Any]] = field(default_factory=dict)
    short: list[dict[str, Any]] = field(default_factory=list)
    night: int = 0  # the invocation (run.json history entry) that made the shard; 0: before history existed
    # The run lease's token of the driver whose actor wrote the shard ("" before fencing existed).
    lease_token: str = ""
    # monitor.enabled: per category what monitoring saved (pipeline/budget/accounting.py monitor_accounting)
    monitor: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per generator that made samples, per category {samples, accepted, rejected, failed, seconds} (a cascade's
    # split; empty in markers written before it: the run's one generator made them all).
    generators: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    version: int = STATS_SCHEMA_VERSION

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardStats:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


@dataclass
class RunInfo(JsonRecord):
    """``run.json``: what a resumed run must match (config hash and input fingerprint)."""

    config: dict[str, Any]
    config_hash: str
    model_ids: dict[str, str]
    input: dict[str, Any]  # fingerprint: files, sizes, row counts
    prompts_uri: str
    shard_size: int
    num_shards: int
    code_version: str  # $REFEREE_SYNTH_CODE_VERSION, a CODE_VERSION file, or git; else "unknown"
    created_at: str
    updated_at: str
    # Installed versions (torch, transformers, diffusers, kornia, spaCy and its model, Pillow, ray, ...);
    # the output-changing ones are part of config_hash.
    libraries: dict[str, str] = field(default_factory=dict)
    # The scorer's exactness record (pipeline/scoring/scorer_record.py): exact, deviations, spaCy, VQA weights.
    scorer: dict[str, Any] = field(default_factory=dict)
    # One entry per invocation on this folder (pipeline/io/nightly.py Night.history_entry): night, times,
    # input fingerprint, prompts added / changed / removed / retired, shards run and failed, code version.
    history: list[dict[str, Any]] = field(default_factory=list)
    version: int = RUN_SCHEMA_VERSION


@dataclass
class Summary(SampleCounts):
    shards_total: int
    shards_completed: int
    shards_failed: list[int]
    wall_seconds: float
    images_per_hour: float
    finished_at: str
    retries: int = 0
    skipped_shards: int = 0
    scorer: dict[str, Any] = field(default_factory=dict)  # as in run.json
    extra: dict[str, Any] = field(default_factory=dict)
    # Cost and target accounting (pipeline/budget/accounting.py run_accounting): overall and per category.
    device_seconds: float = 0.0
    device_hours: float = 0.0
    seconds_per_accepted: float | None = None
    acceptance_rate: float | None = None
    gpu_hour_price: float | None = None
    cost_per_accepted: float | None = None
    total_cost: float | None = None
    target_accepted: int | None = None
    max_samples_per_prompt: int | None = None
    categories: dict[str, dict[str, Any]] = field(default_factory=dict)
    short_prompts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    short_prompts_total: int = 0
    # Complete shards' counts by the night that made them ({"1": {shards, rows, samples, accepted, ...}}).
    nights: dict[str, dict[str, int]] = field(default_factory=dict)
    retired_prompts: int = 0  # --drop-removed: prompts left out of shards.txt, the card and the exports
    retired_accepted: int = 0  # their accepted samples (still in shards/*.tar, not listed)
    # monitor.enabled: iterations saved, monitor overhead, seconds per accepted with and (estimated) without
    monitor: dict[str, Any] = field(default_factory=dict)
    # Per generator: rates, seconds per accepted image and share of the accepted images, overall and per
    # category (pipeline/budget/accounting.py run_generator_accounting).
    generators: dict[str, Any] = field(default_factory=dict)
    version: int = SUMMARY_SCHEMA_VERSION
