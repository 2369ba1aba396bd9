"""Shard planning and the shard writer: WebDataset tar, Parquet sidecar, stats marker last.

Shard ``i`` holds rows ``[i*S, (i+1)*S)`` of the validated input in planned order. The tar and
the sidecar are built in a local temporary folder and published whole; the stats marker is
written only after both are in place, so a crash never leaves a shard that looks done. Each
upload is retried with bounded exponential backoff (a transient object-store error must not cost
the shard's minutes of GPU time); only then does the shard fail.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from pipeline.config import JobConfig
from pipeline.errors import UserError
from pipeline.io import storage
from pipeline.io.lease import LeaseFence
from schemas.prompts import PromptRow
from schemas.run import ShardStats
from schemas.samples import ACCEPTED, FAILED, INVALID_INPUT, MAX_SHARD_SIZE, REJECTED, SampleRecord, sidecar_table

if TYPE_CHECKING:  # torch is heavy; the driver plans shards without it
    import torch

SHARDS_DIR = "shards"
REJECTED_DIR = "rejected"  # apart from shards/, so no `shards/*.tar` glob ever sees rejected samples
_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


@dataclass
class ShardSpec:
    """One shard's work: its rows, each row's slot (its stable place in the shard: the sample key's middle
    digits; ``None``: row i has slot i) and the night (invocation) that runs it."""

    shard: int
    rows: list[PromptRow]
    slots: list[int] | None = None
    night: int = 0

    def slot(self, i: int) -> int:
        return i if self.slots is None else self.slots[i]


def plan_shards(rows: list[PromptRow], shard_size: int) -> list[ShardSpec]:
    """Deterministic: shard i = rows [i*S, (i+1)*S) of the planned order."""
    if not 1 <= shard_size <= MAX_SHARD_SIZE:
        raise UserError(f"shard size must be between 1 and {MAX_SHARD_SIZE}, got {shard_size}")
    from schemas.samples import SHARD_DIGITS

    shards = -(-len(rows) // shard_size)
    if shards > 10**SHARD_DIGITS:  # the sample key names shards with SHARD_DIGITS digits
        raise UserError(f"{len(rows)} rows make {shards} shards of {shard_size}, more than the "
                        f"{10**SHARD_DIGITS} the sample key can name; raise --shard-size")
    return [ShardSpec(i // shard_size, rows[i:i + shard_size]) for i in range(0, len(rows), shard_size)]


def shard_paths(out: str, shard: int) -> dict[str, str]:
    base = storage.join(out, SHARDS_DIR, f"{shard:06d}")
    return {
        "tar": f"{base}.tar", "rejected": storage.join(out, REJECTED_DIR, f"{shard:06d}.tar"),
        "parquet": f"{base}.parquet", "stats": f"{base}.stats.json",
    }


class PublishError(OSError):
    """An upload that still failed after every try: the shard fails (the driver may retry it)."""


@dataclass(frozen=True)
class PublishRetry:
    """Bounded exponential backoff for one upload: waits backoff_s, 2*backoff_s, ... (at most backoff_max_s)."""

    attempts: int
    backoff_s: float
    backoff_max_s: float

    @classmethod
    def from_job(cls, job: JobConfig) -> PublishRetry:
        return cls(job.publish_attempts, job.publish_backoff_s, job.publish_backoff_max_s)

    def run(self, what: str, upload: Callable[[], None]) -> None:
        for attempt in range(1, self.attempts + 1):
            try:
                upload()
                return
            except (OSError, pa.ArrowException) as err:
                first = (str(err).splitlines() or [type(err).__name__])[0]
                if attempt == self.attempts:
                    raise PublishError(f"{first} (gave up after {attempt} tries)") from err
                delay = min(self.backoff_s * 2 ** (attempt - 1), self.backoff_max_s)
                print(f"publishing {what} failed ({first}); try {attempt + 1}/{self.attempts} in {delay:g} s",
                      file=sys.stderr, flush=True)
                time.sleep(delay)


def read_stats(fs: pafs.FileSystem, out: str, shard: int) -> ShardStats | None:
    path = shard_paths(out, shard)["stats"]
    if not storage.exists(fs, path):
        return None
    try:
        return ShardStats.from_dict(json.loads(storage.read_bytes(fs, path)))
    except (ValueError, TypeError, KeyError):
        return None


def shard_is_complete(fs: pafs.FileSystem, out: str, shard: int, config_hash: str) -> bool:
    """The resume's test: the completeness rule every reader applies (``pipeline.io.completeness``)."""
    from pipeline.io.completeness import shard_problem

    return shard_problem(fs, out, shard, config_hash) is None


def encode_image(image: torch.Tensor, fmt: str) -> bytes:
    """3xHxW float in [0, 1] -> encoded bytes."""
    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=_PIL_FORMATS[fmt])
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible tars
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Collects one shard's samples locally, then publishes tars, sidecar and marker in that order.

    Accepted samples go to ``shards/{shard}.tar`` (the training data). With ``keep_rejected``,
    rejected samples' images go to ``rejected/{shard}.tar`` for reports and analysis (no file when
    none was rejected). With a ``fence`` (the driver's lease token), each publish first checks that the
    driver still holds the run folder (``LeaseLost`` otherwise) and the marker records the token.
    """

    def __init__(
        self, fs: pafs.FileSystem, out: str, shard: int, image_format: str, keep_rejected: bool,
        retry: PublishRetry | None = None, fence: LeaseFence | None = None,
    ) -> None:
        self.fs, self.out, self.shard, self.fmt = fs, out, shard, image_format
        self.retry = retry or PublishRetry.from_job(JobConfig())
        self.fence = fence
        self._tmp = tempfile.TemporaryDirectory(prefix=f"shard-{shard:06d}-")
        self._tar_path = Path(self._tmp.name) / "shard.tar"
        self._tar = tarfile.open(self._tar_path, "w", format=tarfile.PAX_FORMAT)
        self._rej_path = Path(self._tmp.name) / "rejected.tar"
        self._keep_rejected = keep_rejected
        self._rej: tarfile.TarFile | None = None  # opened at the first rejected image
        self.records: list[SampleRecord] = []

    def _tar_for(self, status: str) -> tarfile.TarFile | None:
        if status == ACCEPTED:
            return self._tar
        if status != REJECTED or not self._keep_rejected:
            return None
        if self._rej is None:
            self._rej = tarfile.open(self._rej_path, "w", format=tarfile.PAX_FORMAT)
        return self._rej

    def add(self, record: SampleRecord, image: bytes | None = None) -> None:
        """``image``: the encoded bytes (``encode_image``), the very bytes the sample was scored on."""
        if record.status == ACCEPTED and image is None:
            raise ValueError(f"accepted sample {record.key} has no image")
        tar = self._tar_for(record.status) if image is not None else None
        if tar is not None:
            # Member names come from the digits-only key, never from user strings.
            _add_member(tar, f"{record.key}.{self.fmt}", image)
            _add_member(tar, f"{record.key}.txt", (record.prompt or "").encode())
            meta = json.dumps(record.to_json_dict(), ensure_ascii=False, sort_keys=True)
            _add_member(tar, f"{record.key}.json", meta.encode())
        self.records.append(record)

    def finish(
        self, rows: int, seconds: float, config_hash: str, accounting: dict[str, Any] | None = None, night: int = 0,
    ) -> ShardStats:
        """``accounting``: the marker's device-time fields (``pipeline.budget.accounting.shard_accounting``);
        ``night``: the invocation that made the shard (run.json's history)."""
        self._tar.close()
        parquet_path = Path(self._tmp.name) / "shard.parquet"
        pq.write_table(sidecar_table(self.records), parquet_path)
        paths = shard_paths(self.out, self.shard)
        self._upload(self._tar_path, paths["tar"])
        rejected_bytes = 0
        if self._rej is not None:
            self._rej.close()
            rejected_bytes = self._rej_path.stat().st_size
            self._upload(self._rej_path, paths["rejected"])
        else:  # an earlier attempt's (or config's) rejected tar would not match this shard
            self._fence()
            self.retry.run(paths["rejected"], lambda: _delete_if_present(self.fs, paths["rejected"]))
        self._upload(parquet_path, paths["parquet"])
        counts = {s: sum(r.status == s for r in self.records) for s in (ACCEPTED, REJECTED, FAILED, INVALID_INPUT)}
        stats = ShardStats(
            shard=self.shard, rows=rows, samples=len(self.records), accepted=counts[ACCEPTED],
            rejected=counts[REJECTED], failed=counts[FAILED], invalid_input=counts[INVALID_INPUT],
            seconds=round(seconds, 3), config_hash=config_hash, tar_bytes=self._tar_path.stat().st_size,
            parquet_bytes=parquet_path.stat().st_size, rejected_tar_bytes=rejected_bytes,
            finished_at=datetime.now(timezone.utc).isoformat(), night=night,
            lease_token=self.fence.token if self.fence else "", **(accounting or {}),
        )
        marker = json.dumps(stats.to_dict(), indent=1).encode()
        self._fence()
        self.retry.run(paths["stats"], lambda: storage.write_atomic(self.fs, paths["stats"], marker))
        self.close()
        return stats

    def _fence(self) -> None:
        if self.fence is not None:
            self.fence.check()

    def _upload(self, local: Path, path: str) -> None:
        self._fence()
        self.retry.run(path, lambda: storage.upload_file_atomic(self.fs, str(local), path))

    def close(self) -> None:
        for tar in (self._tar, self._rej):
            if tar is not None and not tar.closed:
                tar.close()
        self._tmp.cleanup()


def _delete_if_present(fs: pafs.FileSystem, path: str) -> None:
    if storage.exists(fs, path):
        fs.delete_file(path)
