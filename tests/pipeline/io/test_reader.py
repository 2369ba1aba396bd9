"""finetune_stream under torch.distributed (gloo, 2 ranks) with 2 DataLoader workers per rank: every
accepted sample of the complete shards exactly once per epoch, each caption with its own image and score."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from pipeline.io.shards import ShardWriter, encode_image
from pipeline.io.storage import filesystem_for
from schemas.samples import SampleRecord, sample_key
from tests.conftest import ROOT

_RANK = r"""
import json, os, sys
import torch.distributed as dist
from torch.utils.data import DataLoader
from pipeline.io.reader import finetune_stream

dist.init_process_group("gloo")
seen = []
for epoch in range(2):
    loader = DataLoader(finetune_stream(sys.argv[1], seed=7, epoch=epoch), batch_size=None, num_workers=2)
    seen.append([[caption, round(float(image[0, 0, 0]) * 255), score] for image, caption, score in loader])
json.dump(seen, open(sys.argv[2], "w"))
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_run(out: Path, shards: int, per_shard: int) -> dict[str, tuple[int, float]]:
    """Accepted sample i has caption 'prompt i', every pixel = i/255 and score (i+1)/1000; one rejected per shard."""
    fs, root = filesystem_for(str(out))
    want = {}
    for shard in range(shards):
        w = ShardWriter(fs, root, shard, "png", keep_rejected=True)
        for r in range(per_shard + 1):
            i = shard * (per_shard + 1) + r
            status = "rejected" if r == per_shard else "accepted"
            rec = SampleRecord(key=sample_key(shard, r, 0), shard=shard, row=i, prompt_id=str(i), prompt=f"prompt {i}",
                               category=None, sample_index=0, seed=i, status=status, vqa_score=(i + 1) / 1000)
            w.add(rec, encode_image(torch.full((3, 8, 8), i / 255), "png"))
            if status == "accepted":
                want[f"prompt {i}"] = (i, (i + 1) / 1000)
        w.finish(rows=per_shard + 1, seconds=0.0, config_hash="h")
    (out / "run.json").write_text(json.dumps({"config_hash": "h"}))  # readers check markers against it
    return want


def test_two_ranks_two_workers_see_every_accepted_sample_once_per_epoch(tmp_path) -> None:
    want = _write_run(tmp_path / "run", shards=6, per_shard=3)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, "-c", _RANK, str(tmp_path / "run"), str(tmp_path / f"rank{r}.json")],
                         cwd=ROOT, env=dict(env, RANK=str(r)), stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    orders = []
    for epoch in range(2):
        got = ranks[0][epoch] + ranks[1][epoch]
        captions = [c for c, _, _ in got]
        assert sorted(captions) == sorted(want), f"epoch {epoch}: not every accepted sample exactly once"
        assert all(ranks[0][epoch]) and all(ranks[1][epoch])  # both ranks got work
        for caption, pixel, score in got:
            assert (pixel, score) == want[caption]  # the caption comes with its own image and score
        orders.append(captions)
    assert orders[0] != orders[1]  # reshuffled per epoch


def test_min_score_is_gors_rule_strictly_above_in_float32(tmp_path) -> None:
    """Scores (i+1)/1000: min_score 0.004 keeps 0.006 and up (0.005 is a rejected sample, not in the tar),
    never the equal 0.004; None keeps every accepted sample."""
    from pipeline.io.reader import finetune_stream

    want = _write_run(tmp_path / "run", shards=2, per_shard=4)
    everything = sorted(caption for _, caption, _ in finetune_stream(str(tmp_path / "run")))
    assert everything == sorted(want)
    kept = sorted(caption for _, caption, _ in finetune_stream(str(tmp_path / "run"), min_score=0.004))
    # BLIP-VQA (no scorer recorded): the 4-decimal value; 0.004 itself is dropped.
    assert kept == sorted(c for c, (_, score) in want.items() if score > 0.004 + 1e-9)
    assert want["prompt 3"][1] == 0.004 and "prompt 3" not in kept and "prompt 2" not in kept and kept
