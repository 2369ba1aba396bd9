"""One training process from start (or a checkpoint) to the last step: what Ray Train's workers and the
single-process path both run. ``publish(step, folder, metrics)`` stores each checkpoint: a folder the
function wrote (rank 0: ``trainer.pt``; every rank: ``data-rank{r}.json``, its stream position)."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config
from pipeline.config_loading import from_dict
from pipeline.finetune.data import MixedStream, RunInventory
from pipeline.finetune.loop import FinetuneLoop, _world
from pipeline.finetune.lora import add_lora
from pipeline.finetune.loss import DiffusionParts

TRAINER_FILE = "trainer.pt"

Publish = Callable[[int, str, dict[str, Any]], None]


@dataclass
class FinetuneSpec:
    """Everything a worker needs (picklable: Ray ships it to every worker)."""

    config: dict[str, Any]
    runs: list[tuple[RunInventory, float]]
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cfg(self) -> Config:
        return from_dict(self.config)


def base_model_source(cfg: Config) -> tuple[str, dict[str, str]]:
    """(id or folder, from_pretrained revision kwargs) of the model to finetune."""
    from pipeline.models.loading import model_sources
    from pipeline.models.sources import expand

    m = cfg.models
    if m.tiny or m.small:  # the set's SD stand-in, whatever base_model says
        return model_sources(m)["stable_diffusion"], {}
    return expand(cfg.finetune.base_model or m.stable_diffusion), {"revision": m.revision}


def base_model_name(cfg: Config) -> str:
    m = cfg.models
    if m.tiny or m.small:
        from pipeline.models.tiny import SMALL_LAYOUT_VERSION, TINY_LAYOUT_VERSION

        return f"{TINY_LAYOUT_VERSION if m.tiny else SMALL_LAYOUT_VERSION}-seed{m.tiny_seed}/stable_diffusion"
    return f"{cfg.finetune.base_model or m.stable_diffusion}@{m.revision}"


def load_parts(cfg: Config, device: torch.device | None = None) -> DiffusionParts:
    """The base model's VAE, UNet, text encoder, tokenizer and DDPM scheduler, frozen, fp32."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from pipeline.models.loading import _freeze, _load, resolve_device
    from pipeline.models.quiet import quiet_library_logs

    quiet_library_logs()
    src, rev = base_model_source(cfg)
    key = "stable_diffusion"
    dev = device or resolve_device(cfg.models.device)
    vae = _load("the SD VAE", key, AutoencoderKL.from_pretrained, src, subfolder="vae", **rev)
    unet = _load("the SD UNet", key, UNet2DConditionModel.from_pretrained, src, subfolder="unet", **rev)
    te = _load("the CLIP text encoder", key, CLIPTextModel.from_pretrained, src, subfolder="text_encoder", **rev)
    tok = _load("the CLIP tokenizer", key, CLIPTokenizer.from_pretrained, src, subfolder="tokenizer", **rev)
    sched = _load("the noise scheduler", key, DDPMScheduler.from_pretrained, src, subfolder="scheduler", **rev)
    for module in (vae, unet, te):
        _freeze(module, dev, torch.float32)  # fp32 as GORS ran; bf16 is autocast over fp32 weights
    autocast = torch.bfloat16 if cfg.finetune.mixed_precision == "bf16" else None
    return DiffusionParts(vae=vae, unet=unet, text_encoder=te, tokenizer=tok, scheduler=sched, device=dev,
                          autocast=autocast)


def build_loop(cfg: Config, device: torch.device | None = None) -> FinetuneLoop:
    parts = load_parts(cfg, device)
    add_lora(parts.unet, parts.text_encoder, cfg.finetune)
    return FinetuneLoop(parts, cfg.finetune)


def read_checkpoint(folder: str | Path, rank: int, world: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(trainer state, this rank's data position or None when the checkpoint had another world size)."""
    folder = Path(folder)
    state = torch.load(folder / TRAINER_FILE, map_location="cpu", weights_only=True)
    data_file = folder / f"data-rank{rank}.json"
    data = json.loads(data_file.read_text()) if data_file.exists() else None
    if data is not None and data.get("world") != world:
        data = None  # positions of another split: restart the data at a new epoch below
    return state, data


def write_checkpoint(folder: Path, loop: FinetuneLoop, stream: MixedStream) -> None:
    if loop.rank == 0:
        torch.save(loop.state_dict(), folder / TRAINER_FILE)
    (folder / f"data-rank{loop.rank}.json").write_text(
        json.dumps({"world": loop.world, "step": loop.step, **stream.state()}))


def train_worker(spec: FinetuneSpec, resume: str | None, publish: Publish,
                 device: torch.device | None = None) -> FinetuneLoop:
    cfg = spec.cfg
    fcfg = cfg.finetune
    rank, world = _world()
    loop = build_loop(cfg, device)
    data_state = None
    if resume:
        state, data_state = read_checkpoint(resume, rank, world)
        loop.load_state_dict(state)
        if data_state is None:  # another number of processes: fresh epochs, seeded apart from the old ones
            data_state = {"runs": [{"epoch": 1000 + loop.step, "taken": 0}] * len(spec.runs)}
    stream = MixedStream(spec.runs, fcfg.seed, rank, world, fcfg.resolution, fcfg.shuffle_buffer, data_state)
    bar = _progress(spec.progress and rank == 0, loop.step, fcfg.max_steps)
    t0, done0 = time.perf_counter(), loop.step
    while loop.step < fcfg.max_steps:
        t_step = time.perf_counter()
        images, captions, rewards = stream.batch(loop.step, fcfg.batch_size)
        loss = loop.train_step(images, captions, rewards)
        loop.seconds += time.perf_counter() - t_step
        if bar is not None:
            rate = (loop.step - done0) * fcfg.batch_size * world / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{rate:.2f}")
            bar.update(1)
        if loop.step % fcfg.checkpoint_every == 0 or loop.step == fcfg.max_steps:
            with tempfile.TemporaryDirectory(prefix="finetune-ckpt-") as tmp:
                write_checkpoint(Path(tmp), loop, stream)
                publish(loop.step, tmp, {"step": loop.step, "loss": loss})
    if bar is not None:
        bar.close()
    return loop


def _progress(enabled: bool, start: int, total: int) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="finetune", unit="step", dynamic_ncols=True)
