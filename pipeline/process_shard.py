"""One shard end to end, without Ray: invert -> encode -> score -> filter -> write.

Batches of (prompt, sample) requests go through the engine; each finished image is encoded as it
will be stored, and the decoded file is what gets scored (as T2I-CompBench scores the saved PNG),
so a stored score is what ``jobs/score.py`` finds on the exported file. Acceptance is GORS's
(``pipeline.filter``). Every sample gets a record. A sample whose optimisation or scoring fails is
recorded as ``failed`` with the reason and the shard goes on.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipeline.config import Config
from pipeline.filter import decide
from pipeline.invert import InversionEngine, SampleRequest, sample_seed
from pipeline.models import GeneratorModels, VqaModels
from pipeline.shards import PublishRetry, ShardSpec, ShardWriter, encode_image
from pipeline.vqa import VqaResult, VqaScorer
from schemas.prompts import PromptRow
from schemas.run import ShardStats
from schemas.samples import ACCEPTED, FAILED, INVALID_INPUT, REJECTED, SampleRecord, sample_key

# Debug hook for fault tests: scoring raises for this prompt_id (off unless set).
INJECT_SCORE_ERROR_ENV = "REFEREE_SYNTH_INJECT_SCORE_ERROR"

ProgressFn = Callable[[dict[str, int]], None]


@dataclass
class _Pending:
    row_in_shard: int
    row: PromptRow
    request: SampleRequest


def seed_for(row: PromptRow, sample_index: int, run_seed: int) -> int:
    """A row's own ``seed`` is the base of its samples (seed, seed+1, ...), as the benchmark's 42..51."""
    if row.seed is not None:
        return int(row.seed) + sample_index
    return sample_seed(run_seed, row.prompt_id, sample_index)


class ShardProcessor:
    def __init__(self, cfg: Config, gen: GeneratorModels, vqa: VqaModels, model_ids: dict[str, str]) -> None:
        self.cfg = cfg
        self.engine = InversionEngine(gen, cfg)
        self.scorer = VqaScorer(vqa, cfg)
        self.model_ids = model_ids
        self.config_hash = cfg.hash()

    def _requests(self, spec: ShardSpec) -> Iterator[_Pending]:
        for i, row in enumerate(spec.rows):
            if row.status != "ok":
                continue
            for k in range(row.num_samples):
                seed = seed_for(row, k, self.cfg.job.seed)
                yield _Pending(i, row, SampleRequest(row.prompt or "", row.prompt_id, k, seed))

    def _record(self, spec: ShardSpec, p: _Pending, status: str, **fields) -> SampleRecord:
        return SampleRecord(
            key=sample_key(spec.shard, p.row_in_shard, p.request.sample_index), shard=spec.shard, row=p.row.row,
            prompt_id=p.row.prompt_id, prompt=p.row.prompt, category=p.row.category,
            sample_index=p.request.sample_index, seed=p.request.seed, status=status,
            benchmark_index=p.row.benchmark_index, template=p.row.template,
            config_hash=self.config_hash, model_ids=self.model_ids, extra=p.row.extra, **fields,
        )

    def _invalid_records(self, spec: ShardSpec) -> list[SampleRecord]:
        out = []
        for i, row in enumerate(spec.rows):
            if row.status == "ok":
                continue
            p = _Pending(i, row, SampleRequest(row.prompt or "", row.prompt_id, 0, 0))
            rec = self._record(spec, p, INVALID_INPUT, error=row.error)
            rec.seed = None
            out.append(rec)
        return out

    def _score(self, encoded: list[bytes], pendings: list[_Pending]) -> list[VqaResult | Exception]:
        """Score each stored image as a file reader would see it; a failure fails that sample only."""
        from PIL import Image

        out: list[VqaResult | Exception] = []
        for data, p in zip(encoded, pendings):
            try:
                _maybe_inject_score_error([p.row.prompt_id])
                with Image.open(io.BytesIO(data)) as image:
                    out.append(self.scorer.score_stored([image], [p.row.prompt or ""])[0])
            except Exception as err:  # noqa: BLE001 - recorded as the sample's error
                out.append(err)
        return out

    def _batch_records(
        self, spec: ShardSpec, batch: list[_Pending], writer: ShardWriter
    ) -> dict[str, int]:
        t0 = time.perf_counter()
        results = self.engine.run([p.request for p in batch])
        per_sample = (time.perf_counter() - t0) / max(len(batch), 1)
        ok = [(r, p) for r, p in zip(results, batch) if r.error is None and r.image is not None]
        encoded = [encode_image(r.image, self.cfg.job.image_format) for r, _ in ok]
        scores = self._score(encoded, [p for _, p in ok]) if ok else []
        score_of = {id(p): (s, data) for (_, p), s, data in zip(ok, scores, encoded)}
        counts = {ACCEPTED: 0, REJECTED: 0, FAILED: 0}
        for r, p in zip(results, batch):
            common = dict(
                itm_score=r.itm_score, final_losses=dict(r.final_losses), iterations=r.iterations,
                seconds=round(per_sample, 3),
            )
            p.request.seed = r.seed  # a restarted sample records the seed it finally used
            s, data = score_of.get(id(p), (None, None))
            if s is None or isinstance(s, Exception):
                reason = r.error or f"scoring failed: {type(s).__name__}: {s}"
                rec = self._record(spec, p, FAILED, error=reason[:500], **common)
                writer.add(rec)
            else:
                decision = decide(s.score, p.row.category, self.cfg.filter, p.row.template)
                rec = self._record(
                    spec, p, ACCEPTED if decision.accepted else REJECTED, vqa_score=s.score,
                    vqa_questions=list(s.questions), vqa_answers=list(s.answers), threshold=decision.threshold,
                    **common,
                )
                writer.add(rec, data)
            counts[rec.status] += 1
        return counts

    def process(self, spec: ShardSpec, fs: pafs.FileSystem, out: str, progress: ProgressFn | None = None) -> ShardStats:
        t0 = time.perf_counter()
        job = self.cfg.job
        retry = PublishRetry.from_job(job)
        writer = ShardWriter(fs, out, spec.shard, job.image_format, job.keep_rejected_images, retry)
        try:
            invalid = self._invalid_records(spec)
            for rec in invalid:
                writer.add(rec)
            if invalid and progress:
                progress({INVALID_INPUT: len(invalid)})
            pending = list(self._requests(spec))
            size = self.cfg.engine.batch_size
            for start in range(0, len(pending), size):
                counts = self._batch_records(spec, pending[start:start + size], writer)
                if progress:
                    progress(counts)
            writer.records.sort(key=lambda r: r.key)
            return writer.finish(len(spec.rows), time.perf_counter() - t0, self.config_hash)
        finally:
            writer.close()


def _maybe_inject_score_error(prompt_ids: list[str]) -> None:
    target = os.environ.get(INJECT_SCORE_ERROR_ENV)
    if target and target in prompt_ids:
        raise RuntimeError(f"injected scoring fault for prompt_id {target}")
