"""(image, caption, reward) batches from one or several run folders, per rank, resumable.

Reads each run's complete shards (a stats marker; pipeline/io/reader.py) straight from the accepted tars:
the training set is the run's accepted set. A sample's reward is its judging score as the benchmark's
reward file holds it (BLIP-VQA rounded to 4 decimals, the other scorers raw) and it is kept when GORS's
rule selects it (``reward > threshold`` in float32, with the threshold the filter recorded): the same set
GORS would train on from our export. An accepted sample the rule drops (a run made under an older rule)
is counted, not trained on.

Split across ranks: with at least as many non-empty shards as ranks, whole shards (shuffled per epoch,
the same order everywhere) go round-robin to the ranks; with fewer, every rank reads every shard and keeps
every world-th sample of the same shuffled stream (the global batch is then the same whatever the number of
processes). Every rank cycles epoch after epoch, so all ranks make the same number of steps (Ray Train's
report and the gradient all-reduce are barriers; ranks may see unequal sample counts per epoch).
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.errors import UserError
from pipeline.io import storage
from pipeline.io.completeness import run_config_hash, scan_shards
from pipeline.io.placement import read_placement
from pipeline.io.reader import IMAGE_EXTENSIONS
from pipeline.io.retired import dataset_shards
from schemas.gors import reward_answer, selects  # the benchmark's reward format and GORS's selection


@dataclass(frozen=True)
class RunSource:
    uri: str
    weight: float = 1.0


def parse_run(text: str) -> RunSource:
    """``RUN`` or ``RUN:WEIGHT`` (the last ``:`` followed by a number; s3:// URIs keep theirs)."""
    head, sep, tail = text.rpartition(":")
    if sep and head and "/" not in tail:
        try:
            weight = float(tail)
        except ValueError:
            weight = None
        if weight is not None:
            if not (weight > 0 and np.isfinite(weight)):
                raise UserError(f"--run {text}: the weight must be a positive number")
            return RunSource(head, weight)
    return RunSource(text, 1.0)


def reward_of(record: dict[str, Any]) -> float:
    """The reward GORS reads for this sample: the benchmark's written answer, as float32."""
    return float(np.float32(float(reward_answer(record.get("scorer"), float(record["vqa_score"])))))


def is_selected(record: dict[str, Any]) -> bool:
    threshold = record.get("threshold")
    return threshold is None or selects(reward_answer(record.get("scorer"), float(record["vqa_score"])), threshold)


def preprocess(data: bytes, resolution: int) -> torch.Tensor:
    """GORS's transform: shorter side to ``resolution`` (PIL bilinear), centre crop, no flip, to [-1, 1]."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    if (w, h) != (resolution, resolution):
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        img = img.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@dataclass
class RunInventory:
    """A run's complete shards with accepted samples, and what its run.json says made them."""

    uri: str
    shards: list[int]
    accepted: int
    config_hash: str
    tars: dict[int, str] = field(default_factory=dict)  # shard -> its listed tar (a filtered copy after retirements)
    generator: str = ""
    gpu_seconds: float = 0.0
    run_json: dict[str, Any] = field(default_factory=dict)


def inventory(uri: str) -> RunInventory:
    fs, out = storage.filesystem_for(uri)
    if not storage.exists(fs, storage.join(out, "run.json")):
        raise UserError(f"--run {uri}: not a run folder (no run.json)")
    info = json.loads(storage.read_bytes(fs, storage.join(out, "run.json")))
    shards: list[int] = []
    tars: dict[int, str] = {}
    accepted = 0
    # The completeness rule every reader applies, and the dataset's listing (retired prompts left out).
    scan = scan_shards(fs, out, run_config_hash(fs, out, uri))
    scan.warn("finetune")
    seconds = sum(float(s.seconds or 0.0) for s in scan.complete)
    for listed in dataset_shards(fs, out, scan.complete, read_placement(fs, out), build=False):
        if listed.accepted > 0:
            shards.append(listed.stats.shard)
            tars[listed.stats.shard] = listed.path
            accepted += listed.accepted
    if not accepted:
        raise UserError(f"--run {uri}: no accepted samples in its complete shards")
    cfg = info.get("config", {})
    return RunInventory(uri=uri, shards=shards, accepted=accepted, tars=tars,
                        config_hash=info.get("config_hash", ""),
                        generator=cfg.get("engine", {}).get("generator", "inversion"), gpu_seconds=seconds,
                        run_json=info)


def _tar_samples(uri: str, rel: str) -> Iterator[tuple[str, dict[str, Any], bytes, str]]:
    """(key, record, image bytes, caption) of one listed tar (``rel``: relative to the run), in its order."""
    fs, out = storage.filesystem_for(uri)
    path = storage.join(out, rel)
    parts: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    with fs.open_input_file(path) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if key not in parts:
                parts[key] = {}
                order.append(key)
            parts[key][ext] = tar.extractfile(member).read()
    for key in order:
        p = parts[key]
        image = next((p[e] for e in IMAGE_EXTENSIONS if e in p), None)
        if image is None or "json" not in p:
            continue
        record = json.loads(p["json"])
        yield key, record, image, p.get("txt", b"").decode() or (record.get("prompt") or "")


class RunStream:
    """One run's samples for one rank, epoch after epoch; ``position`` = (epoch, samples taken this epoch)."""

    def __init__(self, inv: RunInventory, seed: int, rank: int, world: int, shuffle_buffer: int,
                 epoch: int = 0, taken: int = 0) -> None:
        self.inv, self.seed, self.rank, self.world = inv, seed, rank, world
        self.shuffle_buffer = shuffle_buffer
        # one process reads the stream the sample split reads: 1 and N processes share the global batches
        self.by_shard = world > 1 and len(inv.shards) >= world
        self.epoch, self.taken = epoch, 0
        self.dropped = 0  # accepted samples GORS's rule would not select
        self._it = self._epoch_iter()
        for _ in range(taken):  # resume: skip what this rank already trained on this epoch
            next(self._it)
            self.taken += 1

    @property
    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "taken": self.taken}

    def _raw(self) -> Iterator[tuple[str, dict[str, Any], bytes, str]]:
        shards = list(self.inv.shards)
        random.Random(f"{self.seed}:{self.epoch}:shards").shuffle(shards)
        if self.by_shard:
            shards = shards[self.rank::self.world]
        for shard in shards:
            for item in _tar_samples(self.inv.uri, self.inv.tars[shard]):
                if is_selected(item[1]):
                    yield item
                else:
                    self.dropped += 1

    def _shuffled(self) -> Iterator[tuple[str, dict[str, Any], bytes, str]]:
        """A bounded shuffle buffer; seeded per rank when ranks read different shards, else the same everywhere."""
        who = self.rank if self.by_shard else "all"
        rng = random.Random(f"{self.seed}:{self.epoch}:{who}:samples")
        buf: list[Any] = []
        for item in self._raw():
            buf.append(item)
            if len(buf) >= self.shuffle_buffer:
                yield buf.pop(rng.randrange(len(buf)))
        while buf:
            yield buf.pop(rng.randrange(len(buf)))

    def _epoch_iter(self) -> Iterator[tuple[str, dict[str, Any], bytes, str]]:
        for i, item in enumerate(self._shuffled()):
            if self.by_shard or i % self.world == self.rank:
                yield item

    def next(self) -> tuple[str, dict[str, Any], bytes, str]:
        for _ in range(2):
            try:
                item = next(self._it)
                self.taken += 1
                return item
            except StopIteration:
                self.epoch, self.taken = self.epoch + 1, 0
                self._it = self._epoch_iter()
        raise UserError(f"--run {self.inv.uri}: rank {self.rank} found no selectable sample in a whole epoch")


class MixedStream:
    """Batches from several runs, each sample's run drawn by weight (from (seed, rank, step, slot))."""

    def __init__(self, runs: list[tuple[RunInventory, float]], seed: int, rank: int, world: int,
                 resolution: int, shuffle_buffer: int, state: dict[str, Any] | None = None) -> None:
        positions = (state or {}).get("runs") or [{"epoch": 0, "taken": 0}] * len(runs)
        if len(positions) != len(runs):
            raise UserError("the checkpoint was made from a different list of --run folders")
        self.streams = [RunStream(inv, seed, rank, world, shuffle_buffer, p["epoch"], p["taken"])
                        for (inv, _), p in zip(runs, positions)]
        self.weights = [w for _, w in runs]
        self.seed, self.rank, self.resolution = seed, rank, resolution

    def state(self) -> dict[str, Any]:
        return {"runs": [s.position for s in self.streams]}

    def batch(self, step: int, size: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        rng = random.Random(f"{self.seed}:{self.rank}:{step}:mix")
        images, captions, rewards = [], [], []
        for _ in range(size):
            i = 0 if len(self.streams) == 1 else rng.choices(range(len(self.streams)), self.weights)[0]
            _, record, image, caption = self.streams[i].next()
            images.append(preprocess(image, self.resolution))
            captions.append(caption)
            rewards.append(reward_of(record))
        return torch.stack(images), captions, torch.tensor(rewards, dtype=torch.float32)
