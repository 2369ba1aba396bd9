"""Read a run back: sidecar records, and a WebDataset stream of (image, caption, score) for finetuning."""

from __future__ import annotations

import functools
import io
import json
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline.io import storage
from pipeline.io.completeness import run_config_hash, scan_shards
from pipeline.io.shards import SHARDS_DIR, shard_paths
from schemas.gors import reward_answer, selects

IMAGE_EXTENSIONS = ("png", "jpg", "webp")


def completed_shards(fs: pafs.FileSystem, out: str, warn: str | None = None) -> list[int]:
    """Complete shards, in order, by the one rule the resume applies (pipeline/io/completeness.py):
    incomplete shards are never read; with ``warn`` (who reads), each one left out is named once."""
    scan = scan_shards(fs, out, run_config_hash(fs, out, out))
    if warn:
        scan.warn(warn)
    return scan.shards


def sidecar_records(run: str, warn: str | None = None, shards: list[int] | None = None,
                    include_retired: bool = False) -> list[dict[str, Any]]:
    """Every sample record of the run's complete shards (every night's; or of ``shards``, already checked), in
    key order; without ``include_retired``, none of a prompt retired by ``--drop-removed``."""
    from pipeline.io.placement import read_placement
    from pipeline.io.retired import retired_filter

    fs, out = storage.filesystem_for(run)
    live = (lambda rec: True) if include_retired else retired_filter(read_placement(fs, out))
    rows: list[dict[str, Any]] = []
    for shard in completed_shards(fs, out, warn) if shards is None else shards:
        with fs.open_input_file(storage.join(out, SHARDS_DIR, f"{shard:06d}.parquet")) as handle:
            rows += [r for r in pq.read_table(handle).to_pylist() if live(r)]
    return sorted(rows, key=lambda r: r["key"])


def shard_images(fs: pafs.FileSystem, out: str, shard: int, keys: set[str]) -> Iterator[tuple[str, bytes]]:
    """(key, encoded image) for the wanted keys of one shard: accepted tar, then rejected tar if kept."""
    import tarfile

    paths = shard_paths(out, shard)
    for path in (paths["tar"], paths["rejected"]):
        if not storage.exists(fs, path):
            continue
        try:
            with fs.open_input_file(path) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    if key in keys and ext in IMAGE_EXTENSIONS:
                        yield key, tar.extractfile(member).read()
        except (tarfile.TarError, OSError) as err:  # damaged after its marker was written: skip what is left
            print(f"warning: {path}: not a readable tar ({err}); its remaining images are left out", file=sys.stderr)


def tar_urls(run: str) -> list[str]:
    """The dataset's tars: every complete shard's, through its filtered copy where prompts were retired."""
    from pipeline.io.placement import read_placement
    from pipeline.io.retired import dataset_shards

    fs, out = storage.filesystem_for(run)
    stats = scan_shards(fs, out, run_config_hash(fs, out, out)).complete
    paths = [storage.join(out, x.path) for x in dataset_shards(fs, out, stats, read_placement(fs, out), build=False)]
    if storage.is_local(fs):
        return paths
    # webdataset streams object stores through a shell pipe; pyarrow's path keeps the bucket.
    scheme = run.split("://", 1)[0]
    return [f"pipe:{sys.executable} -m pipeline.io.cat {scheme}://{p}" for p in paths]


def sample_generator(record: dict[str, Any]) -> str:
    """The generator that made a sample (records before schema 4 have none: inversion made them all)."""
    return record.get("generator") or "inversion"


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded image -> 3xHxW float tensor in [0, 1]."""
    arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def finetune_stream(
    run: str, min_score: float | None = None, seed: int = 0, epoch: int = 0, shuffle_buffer: int = 256,
    generators: Sequence[str] | None = None,
) -> Any:
    """(image, caption, VQA score) of every accepted sample of the run's complete shards: a webdataset
    pipeline (a torch ``IterableDataset``) for multi-GPU training.

    Shards are shuffled with ``seed + epoch`` (the same order on every rank), split by
    torch.distributed rank and then by DataLoader worker, and samples are shuffled within a
    ``shuffle_buffer``: across all ranks and workers each accepted sample comes exactly once per
    epoch. Build one per epoch with its ``epoch`` (cheap). Ranks may get unequal sample counts when
    shards do not divide evenly; training loops that need equal steps should cap them. Use the score
    as the reward weight of a GORS-style reward-weighted finetuning loss. ``generators``: only samples
    those generators made (a cascade's ``sd_sampling`` or ``inversion`` part); None: all.
    """
    import random

    import webdataset as wds

    urls = tar_urls(run)
    random.Random(f"{seed}:{epoch}").shuffle(urls)
    return wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(),
        wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 64), rng=random.Random(f"{seed}:{epoch}:samples")),
        # picklable for spawned DataLoader workers
        wds.select(functools.partial(_selected, min_score, tuple(generators) if generators is not None else None)),
        wds.map(_training_pair),
    )


def _score(sample: dict[str, Any]) -> float:
    return float(json.loads(sample["json"])["vqa_score"])


def _selected(min_score: float | None, generators: tuple[str, ...] | None, sample: dict[str, Any]) -> bool:
    """Every accepted sample (of ``generators``, when given), or with ``min_score`` GORS's rule on top: strictly
    above, in float32, on the value as the benchmark writes it (``schemas.gors``)."""
    if min_score is None and generators is None:
        return True
    meta = json.loads(sample["json"])
    if generators is not None and sample_generator(meta) not in generators:
        return False
    if min_score is None:
        return True
    return selects(reward_answer(meta.get("scorer"), float(meta["vqa_score"])), min_score)


def _training_pair(sample: dict[str, Any]) -> tuple[torch.Tensor, str, float]:
    image_key = next(k for k in IMAGE_EXTENSIONS if k in sample)
    return decode_image(sample[image_key]), sample["txt"].decode(), _score(sample)
