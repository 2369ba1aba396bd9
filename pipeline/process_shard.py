"""One shard end to end, without Ray: invert -> encode -> score -> filter -> write.

Batches of (prompt, sample) requests go through the engine; each finished image is encoded as it
will be stored, and the decoded file is what gets scored (as T2I-CompBench scores the saved PNG),
so a stored score is what ``jobs/score.py`` finds on the exported file. The scorer is the
category's (``scoring.by_category``: BLIP-VQA, CLIPScore, the spatial rule or 3-in-1, see
``pipeline.scoring.scorers``), loaded when a batch first needs it and recorded per sample.
Acceptance is GORS's (``pipeline.scoring.filter``). Which attempts are made, and in which batches,
is ``pipeline.budget.refill``'s: fixed ``num_samples`` per prompt, or accept-until-target with
in-shard refill; with a cascade (``engine.generator: cascade``) each stage's attempts run in that stage's
own batches on that stage's engine (``pipeline.engine.cascade``), and each record names its generator and
stage. Every sample gets a record. A sample whose optimisation or scoring fails is
recorded as ``failed`` with the reason and the shard goes on. A sample's ``seconds`` is its
device time (``pipeline.budget.accounting``).
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipeline.budget.accounting import shard_accounting
from pipeline.budget.refill import AttemptQueue
from pipeline.config import CASCADE, Config, cascade_budgets, prompt_attempt_limit
from pipeline.engine.cascade import make_stages
from pipeline.engine.invert import InversionEngine, SampleRequest, sample_seed
from pipeline.engine.monitor import MonitorScore
from pipeline.io.lease import LeaseFence
from pipeline.io.shards import PublishRetry, ShardSpec, ShardWriter, encode_image
from pipeline.models.loading import GeneratorModels, VqaModels
from pipeline.scoring.filter import decide
from pipeline.scoring.scorers import Judgement, ScorerSet
from schemas.prompts import PromptRow
from schemas.run import ShardStats
from schemas.samples import ACCEPTED, FAILED, INVALID_INPUT, REJECTED, SampleRecord, sample_key

# Debug hook for fault tests: scoring raises for this prompt_id (off unless set).
INJECT_SCORE_ERROR_ENV = "REFEREE_SYNTH_INJECT_SCORE_ERROR"

_UNSCORABLE = "rejected (filter.accept_unscorable is false)"

ProgressFn = Callable[[dict[str, int]], None]


@dataclass
class _Pending:
    row_in_shard: int
    row: PromptRow
    request: SampleRequest
    stage: int = 0  # index into ShardProcessor.stages


def seed_for(row: PromptRow, sample_index: int, run_seed: int) -> int:
    """A row's own ``seed`` is the base of its samples (seed, seed+1, ...), as the benchmark's 42..51."""
    if row.seed is not None:
        return int(row.seed) + sample_index
    return sample_seed(run_seed, row.prompt_id, sample_index)


class ShardProcessor:
    def __init__(self, cfg: Config, gen: GeneratorModels, vqa: VqaModels | None, model_ids: dict[str, str]) -> None:
        self.cfg = cfg
        self.stages = make_stages(gen, cfg)  # one per generator of a cascade; else the run's one generator
        self.engine = self.stages[0].engine
        self.scorers = ScorerSet(cfg, vqa)  # None: BLIP-VQA loads when a category first needs it
        self.model_ids = model_ids
        self.config_hash = cfg.hash()
        self.cascade = cfg.engine.generator == CASCADE

    def _queue(self, spec: ShardSpec) -> AttemptQueue:
        """The shard's attempts: fixed ``num_samples`` per row, or refilled until the job's target (over the
        cascade's stages in turn)."""
        valid = [(i, row.num_samples) for i, row in enumerate(spec.rows) if row.status == "ok"]
        budgets = [cascade_budgets(self.cfg, spec.rows[i].category) for i, _ in valid] if self.cascade else None
        return AttemptQueue.for_rows(valid, self.cfg.job.target_accepted, prompt_attempt_limit(self.cfg), budgets)

    def _pending(self, spec: ShardSpec, row_in_shard: int, k: int, stage: int = 0) -> _Pending:
        row = spec.rows[row_in_shard]
        seed = seed_for(row, k, self.cfg.job.seed)
        request = SampleRequest(row.prompt or "", row.prompt_id, k, seed, row.category)
        return _Pending(row_in_shard, row, request, stage)

    def _record(self, spec: ShardSpec, p: _Pending, status: str, **fields) -> SampleRecord:
        return SampleRecord(
            key=sample_key(spec.shard, spec.slot(p.row_in_shard), p.request.sample_index), shard=spec.shard,
            row=p.row.row, night=spec.night,
            prompt_id=p.row.prompt_id, prompt=p.row.prompt, category=p.row.category,
            sample_index=p.request.sample_index, seed=p.request.seed, status=status,
            benchmark_index=p.row.benchmark_index, template=p.row.template,
            config_hash=self.config_hash, model_ids=self.model_ids, extra=p.row.extra,
            generator=self.stages[p.stage].generator, stage=p.stage + 1 if self.cascade else None, **fields,
        )

    def _invalid_records(self, spec: ShardSpec) -> list[SampleRecord]:
        out = []
        for i, row in enumerate(spec.rows):
            if row.status == "ok":
                continue
            p = _Pending(i, row, SampleRequest(row.prompt or "", row.prompt_id, 0, 0))
            rec = self._record(spec, p, INVALID_INPUT, error=row.error)
            rec.seed = None
            rec.generator, rec.stage = self.cfg.engine.generator, None  # nothing was made for it
            out.append(rec)
        return out

    def _encode_and_score(self, image, p: _Pending) -> tuple[bytes, Judgement | Exception, float]:
        """Score the stored image as a file reader would see it; a failure fails that sample only.

        Returns the encoded bytes, the result (or the error) and the seconds this sample's own
        encoding and scoring took (part of its device time)."""
        from PIL import Image

        t0 = time.perf_counter()
        data = encode_image(image, self.cfg.job.image_format)
        try:
            _maybe_inject_score_error([p.row.prompt_id])
            with Image.open(io.BytesIO(data)) as stored:
                result: Judgement | Exception = self.scorers.judge(stored, p.row.prompt or "", p.row.category)
        except Exception as err:  # noqa: BLE001 - recorded as the sample's error
            result = err
        return data, result, time.perf_counter() - t0

    def _batch_records(self, spec: ShardSpec, batch: list[_Pending], writer: ShardWriter) -> list[SampleRecord]:
        """Make one batch's images (one stage's engine), score each, write one record per sample (in batch order)."""
        results = self.stages[batch[0].stage].engine.run([p.request for p in batch])
        self.scorers.prepare({self.scorers.scorer_name(p.row.category) for p in batch})  # untimed model loads
        return [self._result_record(spec, p, r, writer) for r, p in zip(results, batch)]

    def _result_record(self, spec: ShardSpec, p: _Pending, r, writer: ShardWriter) -> SampleRecord:
        """Score one engine result's image as stored, decide, write its record (and image)."""
        data, s, score_s = (None, None, 0.0)
        if r.error is None and r.image is not None:
            data, s, score_s = self._encode_and_score(r.image, p)
        monitored = {}
        if r.exit_reason is not None:  # monitor.enabled (pipeline/engine/monitor.py)
            best = r.best
            won = r.iterations
            if best is not None and not isinstance(s, Exception) and s is not None and best.score > s.score:
                data, s = best.payload  # the best-scored checked iterate is the one stored
                won = best.iteration
            monitored = dict(exit_reason=r.exit_reason, monitor_trace=[dict(t) for t in r.monitor_trace],
                             monitor_seconds=round(r.monitor_seconds, 3),
                             best_iteration=won if self.cfg.monitor.best_iterate and r.error is None else None)
        common = dict(
            itm_score=r.itm_score, final_losses=dict(r.final_losses), iterations=r.iterations,
            seconds=round(r.seconds + score_s, 3), score_seconds=round(score_s, 3),
            referee_scores=dict(r.referee_scores), referee_skipped=dict(r.referee_skipped), **monitored,
        )
        p.request.seed = r.seed  # a restarted sample records the seed it finally used
        if s is None or isinstance(s, Exception):
            reason = r.error or f"scoring failed: {type(s).__name__}: {s}"
            rec = self._record(spec, p, FAILED, error=reason[:500], **common)
            writer.add(rec)
            return rec
        scorable = s.scorable
        decision = decide(s.score, p.row.category, self.cfg.filter, p.row.template, scorable, s.scorer)
        rec = self._record(
            spec, p, ACCEPTED if decision.accepted else REJECTED, vqa_score=s.score,
            error=None if scorable or decision.accepted else f"{s.note}; {_UNSCORABLE}",
            vqa_questions=list(s.questions), vqa_answers=list(s.answers), threshold=decision.threshold,
            scorer=s.scorer, score_parts=dict(s.parts),
            **common,
        )
        writer.add(rec, data)
        return rec

    # ---- monitored runs (monitor.enabled): continuous batching, early exit, best iterate ----------
    def _monitor_scores(self, images, requests: list[SampleRequest], pending: dict) -> list[MonitorScore]:
        """The run's own scorer on each current image as it would be stored, with the sample's threshold.

        The payload (stored bytes, judgement) is what best-iterate stores if this check wins."""
        from PIL import Image

        out = []
        for image, req in zip(images, requests):
            p = pending[(req.prompt_id, req.sample_index)]
            data = encode_image(image, self.cfg.job.image_format)
            try:
                with Image.open(io.BytesIO(data)) as stored:
                    j = self.scorers.judge(stored, p.row.prompt or "", p.row.category)
            except Exception:  # noqa: BLE001 - a check that cannot score never exits the sample
                out.append(MonitorScore(float("-inf"), None))
                continue
            threshold = decide(j.score, p.row.category, self.cfg.filter, p.row.template, j.scorable,
                               j.scorer).threshold
            out.append(MonitorScore(j.score, threshold if j.scorable else None, (data, j)))
        return out

    def _stream_records(self, spec: ShardSpec, queue: AttemptQueue, writer: ShardWriter,
                        progress: ProgressFn | None) -> None:
        """Samples leave as they finish; each free slot takes the queue's next attempt, and a finished sample
        resolves and refills the queue at once (the same order on every run: it depends only on scores)."""
        pending: dict[tuple[str, int], _Pending] = {}

        def feed(n: int) -> list[SampleRequest]:
            batch = [self._pending(spec, i, k) for i, k in queue.next_batch(n)]
            for p in batch:
                pending[(p.request.prompt_id, p.request.sample_index)] = p
            return [p.request for p in batch]

        categories = {self.scorers.scorer_name(row.category) for row in spec.rows if row.status == "ok"}
        self.scorers.prepare(categories)  # untimed model loads
        self.engine.monitor_score = lambda images, reqs: self._monitor_scores(images, reqs, pending)
        for r in self.engine.stream(feed):
            p = pending.pop((r.request.prompt_id, r.request.sample_index))
            rec = self._result_record(spec, p, r, writer)
            queue.resolve(p.row_in_shard, rec.status == ACCEPTED)
            queue.refill()
            if progress:
                progress(_counts([rec]))

    def process(self, spec: ShardSpec, fs: pafs.FileSystem, out: str, progress: ProgressFn | None = None,
                fence: LeaseFence | None = None) -> ShardStats:
        """``fence``: the driver's lease, checked before any work and before each publish."""
        t0 = time.perf_counter()
        job = self.cfg.job
        if fence is not None:
            fence.check()  # a driver that lost its run folder gets no more GPU time spent for it
        retry = PublishRetry.from_job(job)
        writer = ShardWriter(fs, out, spec.shard, job.image_format, job.keep_rejected_images, retry, fence)
        try:
            invalid = self._invalid_records(spec)
            for rec in invalid:
                writer.add(rec)
            if invalid and progress:
                progress({INVALID_INPUT: len(invalid)})
            queue = self._queue(spec)
            if self.cfg.monitor.enabled and isinstance(self.engine, InversionEngine):
                self._stream_records(spec, queue, writer, progress)
            sizes = [stage.batch_size for stage in self.stages]
            while len(queue):
                stage, items = queue.next_stage_batch(sizes)
                batch = [self._pending(spec, i, k, stage) for i, k in items]
                records = self._batch_records(spec, batch, writer)
                for p, rec in zip(batch, records):
                    queue.resolve(p.row_in_shard, rec.status == ACCEPTED)
                queue.refill()  # after the whole batch is scored: the same refills on every run
                if progress:
                    progress(_counts(records))
            writer.records.sort(key=lambda r: r.key)
            accounting = shard_accounting(writer.records, spec.rows, queue.prompts, self._full_iterations())
            return writer.finish(len(spec.rows), time.perf_counter() - t0, self.config_hash, accounting,
                                 night=spec.night)
        finally:
            writer.close()


    def _full_iterations(self) -> int | None:
        """Iterations of a sample that runs them all (monitored runs' savings are counted against it)."""
        if not self.cfg.monitor.enabled:
            return None
        return self.cfg.optim.iterations + self.cfg.optim.tail_iterations


def _counts(records: list[SampleRecord]) -> dict[str, int]:
    counts = {ACCEPTED: 0, REJECTED: 0, FAILED: 0}
    for rec in records:
        counts[rec.status] += 1
    return counts


def _maybe_inject_score_error(prompt_ids: list[str]) -> None:
    target = os.environ.get(INJECT_SCORE_ERROR_ENV)
    if target and target in prompt_ids:
        raise RuntimeError(f"injected scoring fault for prompt_id {target}")
