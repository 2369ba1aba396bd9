"""A shard processor without models: the scale benchmark and scheduling tests use it.

It keeps the shard contract of ``ShardProcessor`` (one sidecar record per sample, the tar, the
stats marker last, progress per shard, the publish retries) and skips inversion and scoring: every
sample is recorded ``rejected`` with no image. No torch import, so an actor costs only Ray's
worker process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pyarrow.fs as pafs

from pipeline.config import Config
from pipeline.io.lease import LeaseFence
from pipeline.io.shards import PublishRetry, ShardSpec, ShardWriter
from schemas.prompts import PromptRow
from schemas.run import ShardStats
from schemas.samples import INVALID_INPUT, REJECTED, SampleRecord, sample_key

NOOP_ENV = "REFEREE_SYNTH_NOOP_PROCESSOR"  # "1": actors use this processor (benchmarks, tests)
NOOP_SECONDS_ENV = "REFEREE_SYNTH_NOOP_SECONDS"  # optional: seconds each shard takes (scheduling tests)


class NoopProcessor:
    def __init__(self, cfg: Config, model_ids: dict[str, str]) -> None:
        self.cfg, self.model_ids, self.config_hash = cfg, model_ids, cfg.hash()

    def _records(self, spec: ShardSpec, i: int, row: PromptRow) -> list[SampleRecord]:
        ok = row.status == "ok"
        return [
            SampleRecord(
                key=sample_key(spec.shard, spec.slot(i), k), shard=spec.shard, row=row.row, night=spec.night,
                prompt_id=row.prompt_id,
                prompt=row.prompt, category=row.category, sample_index=k, seed=None,
                status=REJECTED if ok else INVALID_INPUT, error=None if ok else row.error,
                config_hash=self.config_hash, model_ids=self.model_ids, extra=row.extra,
            )
            for k in range(row.num_samples if ok else 1)
        ]

    def process(
        self, spec: ShardSpec, fs: pafs.FileSystem, out: str,
        progress: Callable[[dict[str, int]], None] | None = None, fence: LeaseFence | None = None,
    ) -> ShardStats:
        t0 = time.perf_counter()
        if fence is not None:
            fence.check()
        time.sleep(float(os.environ.get(NOOP_SECONDS_ENV) or 0))
        job = self.cfg.job
        writer = ShardWriter(fs, out, spec.shard, job.image_format, False, retry=PublishRetry.from_job(job),
                             fence=fence)
        try:
            for i, row in enumerate(spec.rows):
                for rec in self._records(spec, i, row):
                    writer.add(rec)
            if progress:
                counts: dict[str, int] = {}
                for rec in writer.records:
                    counts[rec.status] = counts.get(rec.status, 0) + 1
                progress(counts)
            return writer.finish(len(spec.rows), time.perf_counter() - t0, self.config_hash, night=spec.night)
        finally:
            writer.close()
