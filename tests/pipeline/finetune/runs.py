"""Hand-built run folders for the finetune tests: a run.json and complete shards of accepted samples."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.io.shards import ShardWriter, encode_image
from pipeline.io.storage import filesystem_for
from schemas.samples import SampleRecord, sample_key

CAPTIONS = ["a red car", "a blue cup", "a green apple", "a yellow book", "a black dog", "a white cat"]


def write_run(out: Path, shards: int = 1, per_shard: int = 4, size: int = 64, generator: str = "inversion",
              config_hash: str = "h") -> list[tuple[str, float]]:
    """Accepted sample i: caption CAPTIONS[i % 6], a smooth image of its own, BLIP-VQA score 0.6 + i/100, threshold
    0.5. Returns (caption, score) per accepted sample."""
    fs, root = filesystem_for(str(out))
    out.mkdir(parents=True, exist_ok=True)
    info = {"config_hash": config_hash, "config": {"engine": {"generator": generator}}}
    (out / "run.json").write_text(json.dumps(info))
    made = []
    for shard in range(shards):
        w = ShardWriter(fs, root, shard, "png", keep_rejected=False)
        for r in range(per_shard):
            i = shard * per_shard + r
            g = torch.Generator().manual_seed(i)
            image = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=(size, size),
                                                    mode="bilinear")[0]
            score = 0.6 + i / 100
            rec = SampleRecord(key=sample_key(shard, r, 0), shard=shard, row=i, prompt_id=str(i),
                               prompt=CAPTIONS[i % 6], category="color", sample_index=0, seed=i, status="accepted",
                               vqa_score=score, threshold=0.5, scorer="blip_vqa")
            w.add(rec, encode_image(image, "png"))
            made.append((CAPTIONS[i % 6], score))
        w.finish(rows=per_shard, seconds=3.0, config_hash=config_hash)
    return made
