"""GORS's objective: the denoising MSE of each image, weighted by its reward, averaged over the batch.

T2I-CompBench GORS_finetune/train_text_to_image.py:784-833 (docs/FINETUNE.md): z0 a sample of the VAE
posterior x the scaling factor; eps ~ N(0, I); t uniform in [0, T); target eps (or the velocity for
v-prediction); the caption's last hidden state as condition, never dropped;
loss = (1/B) sum_b r_b * mean_{C,H,W} (unet(z_t, t, c) - target)^2, in float32.
Every random draw of sample b comes from its own generator keyed by (seed, step, global index): the draws
do not depend on the number of processes (GORS seeds every rank alike, so all GPUs drew the same noise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.engine.rng import generator


def reward_weighted_mse(pred: torch.Tensor, target: torch.Tensor,
                        rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-sample MSE): mean over the batch of reward x per-image mean squared error, in float32."""
    per_sample = (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.dim())))
    return (rewards.float().to(per_sample.device) * per_sample).mean(), per_sample


@dataclass
class DiffusionParts:
    """The frozen and adapted SD parts the loss runs through."""

    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any  # DDPMScheduler of the base model (its betas, prediction type)
    device: torch.device
    dtype: torch.dtype = torch.float32  # of the frozen weights
    autocast: torch.dtype | None = None  # bf16 mixed precision; None = float32


def sample_draws(seed: int, step: int, index: int, latent_shape: Sequence[int], num_timesteps: int):
    """(posterior eps, noise, timestep) of global sample ``index`` at ``step``: CPU draws, the same everywhere."""
    gen = generator(seed, "finetune", step, index)
    posterior = torch.randn(tuple(latent_shape), generator=gen)
    noise = torch.randn(tuple(latent_shape), generator=gen)
    t = int(torch.randint(0, num_timesteps, (1,), generator=gen))
    return posterior, noise, t


def encode_captions(parts: DiffusionParts, captions: Sequence[str]) -> torch.Tensor:
    """Padded to the tokenizer's max length (77), no attention mask: as SD and GORS condition."""
    ids = parts.tokenizer(list(captions), padding="max_length", max_length=parts.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids.to(parts.device)
    return parts.text_encoder(ids)[0]


def training_loss(parts: DiffusionParts, images: torch.Tensor, captions: Sequence[str], rewards: torch.Tensor,
                  seed: int, step: int, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """GORS's loss on a batch of images in [-1, 1] ([B, 3, H, W]); ``indices`` are the samples' places in the
    global batch (what keys their draws). Returns (loss, per-sample MSE)."""
    sched = parts.scheduler
    with torch.no_grad():
        dist = parts.vae.encode(images.to(parts.device, parts.dtype)).latent_dist
    shape = dist.mean.shape[1:]
    draws = [sample_draws(seed, step, i, shape, sched.config.num_train_timesteps) for i in indices]
    post = torch.stack([d[0] for d in draws]).to(parts.device, dist.mean.dtype)
    z0 = (dist.mean + dist.std * post) * parts.vae.config.scaling_factor
    noise = torch.stack([d[1] for d in draws]).to(parts.device, z0.dtype)
    t = torch.tensor([d[2] for d in draws], device=parts.device, dtype=torch.long)
    noisy = sched.add_noise(z0, noise, t)
    if sched.config.prediction_type == "epsilon":
        target = noise
    elif sched.config.prediction_type == "v_prediction":
        target = sched.get_velocity(z0, noise, t)
    else:
        raise ValueError(f"unsupported prediction type {sched.config.prediction_type!r}")
    with torch.autocast(parts.device.type, dtype=parts.autocast or torch.float32, enabled=parts.autocast is not None):
        cond = encode_captions(parts, captions)
        pred = parts.unet(noisy.to(parts.dtype), t, cond.to(parts.dtype)).sample
    return reward_weighted_mse(pred, target, rewards)
