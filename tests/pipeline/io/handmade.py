"""Run folders built by hand with the real ShardWriter (readers' tests): no models, no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline.io.shards import ShardWriter, encode_image
from pipeline.io.storage import filesystem_for
from schemas.samples import SampleRecord, sample_key

CONFIG_HASH = "h"


def make_run(out: Path, shards: dict[int, list[tuple[str, str]]], config_hash: str = CONFIG_HASH,
             category: str = "color") -> dict[int, list[str]]:
    """``shards``: shard id -> [(prompt, status)], one sample per row; accepted samples get a random image.
    Writes run.json with ``config_hash``; returns each shard's keys."""
    fs, root = filesystem_for(str(out))
    rng = np.random.default_rng(0)
    keys: dict[int, list[str]] = {}
    for shard, rows in shards.items():
        w = ShardWriter(fs, root, shard, "png", keep_rejected=False)
        for row, (prompt, status) in enumerate(rows):
            rec = SampleRecord(key=sample_key(shard, row, 0), shard=shard, row=row, prompt_id=f"{shard}-{row}",
                               prompt=prompt, category=category, sample_index=0, seed=row, status=status,
                               vqa_score=0.9 if status == "accepted" else 0.1, threshold=0.5,
                               config_hash=config_hash)
            image = torch.from_numpy(rng.random((3, 16, 16), dtype=np.float32))
            w.add(rec, encode_image(image, "png") if status == "accepted" else None)
            keys.setdefault(shard, []).append(rec.key)
        w.finish(rows=len(rows), seconds=0.0, config_hash=config_hash)
    (out / "run.json").write_text(json.dumps({"config_hash": config_hash, "config": {}}))
    return keys
