"""Score Distillation Sampling gradient from the frozen SD-1.5 UNet.

For each sample: t ~ U{t_min..t_max}, eps ~ N(0, I) from the sample's own generator,
z_t = sqrt(a_t) z + sqrt(1 - a_t) eps, classifier-free guidance e = e_u + g (e_c - e_u) with the
condition ``prefix + prompt`` and the unconditional "", grad = w (e - eps), NaN to zero, times
the SDS weight, divided by the normaliser (the authors' ``sum / (64 * 64)`` loss). Text embeddings
are computed once per prompt and cached.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

import torch

from pipeline.config import SdsConfig
from pipeline.engine.rng import generator
from pipeline.models.loading import GeneratorModels

_PROMPT_CACHE_SIZE = 256  # text embeddings kept (LRU): 77 x 768 floats each with SD-1.5


def cosine_schedule(start: float, end: float, step: int, steps: int) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``steps`` and after)."""
    if steps <= 0:
        return end
    frac = min(max(step, 0), steps) / steps
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


class SdsGuidance:
    def __init__(self, models: GeneratorModels, cfg: SdsConfig) -> None:
        self.cfg = cfg
        self.unet = models.unet
        self.text_encoder = models.text_encoder
        self.tokenizer = models.clip_tokenizer
        self.device = models.device
        scheduler = models.scheduler
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.prediction_type = scheduler.config.prediction_type
        # Per prompt, bounded: long-lived actors see unbounded streams of prompts.
        self._cache = functools.lru_cache(maxsize=_PROMPT_CACHE_SIZE)(self._encode)

    def weight(self, iteration: int, total: int) -> float:
        """The SDS weight: cosine ``weight_start`` -> ``weight_end`` over the whole run."""
        return cosine_schedule(self.cfg.weight_start, self.cfg.weight_end, iteration, total - 1)

    @torch.no_grad()
    def _encode(self, text: str) -> torch.Tensor:
        tok = self.tokenizer(
            [text], padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        )
        return self.text_encoder(tok.input_ids.to(self.device)).last_hidden_state[0]

    def text_embedding(self, text: str) -> torch.Tensor:
        """[77, D] CLIP embedding of a text, cached (LRU)."""
        return self._cache(text)

    def condition(self, prompt: str) -> torch.Tensor:
        return self.text_embedding(self.cfg.prefix + prompt)

    def _draws(self, z: torch.Tensor, seeds: Sequence[int], iteration: int | Sequence[int]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample timestep and noise, each from the sample's own generator (and own iteration)."""
        ts, eps = [], []
        for b, seed in enumerate(seeds):
            gen = generator(seed, "sds", per_sample(iteration, b), device=z.device)
            t = torch.randint(self.cfg.t_min, self.cfg.t_max + 1, (1,), generator=gen, device=z.device)
            ts.append(t)
            eps.append(torch.randn(z[b].shape, generator=gen, device=z.device, dtype=torch.float32))
        return torch.cat(ts), torch.stack(eps)

    def _eps_prediction(self, z_t: torch.Tensor, t: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        uncond = self.text_embedding("")
        cond = torch.stack([self.condition(p) for p in prompts])
        embeds = torch.cat([uncond.expand_as(cond), cond])
        latents = torch.cat([z_t, z_t]).to(self.unet.dtype)
        out = self.unet(latents, torch.cat([t, t]), encoder_hidden_states=embeds.to(self.unet.dtype)).sample
        return out.float()

    @torch.no_grad()
    def grad(
        self,
        z: torch.Tensor,
        prompts: Sequence[str],
        seeds: Sequence[int],
        iteration: int | Sequence[int],
        weight: float | Sequence[float],
        autocast: AbstractContextManager | None = None,
    ) -> torch.Tensor:
        """SDS gradient wrt z (float32, same shape), already weighted and normalised.

        ``iteration`` and ``weight`` are one value for the batch, or one per sample (samples at different
        iterations: monitored runs, where a batch refills as samples exit)."""
        z = z.detach().float()
        t, eps = self._draws(z, seeds, iteration)
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z + (1 - a).sqrt() * eps
        with autocast or nullcontext():
            pred = self._eps_prediction(z_t, t, prompts)
        if self.prediction_type == "v_prediction":  # v -> eps
            pred = a.sqrt().repeat(2, 1, 1, 1) * pred + (1 - a).sqrt().repeat(2, 1, 1, 1) * torch.cat([z_t, z_t])
        e_u, e_c = pred.chunk(2)
        e = e_u + self.cfg.guidance_scale * (e_c - e_u)
        g = torch.nan_to_num(self.cfg.grad_scale * (e - eps), nan=0.0, posinf=0.0, neginf=0.0)
        if isinstance(weight, (int, float)):
            return g * (weight / self.cfg.normalizer)
        scale = torch.tensor([w / self.cfg.normalizer for w in weight], device=g.device, dtype=g.dtype)
        return g * scale.view(-1, 1, 1, 1)


def per_sample(value: int | Sequence[int], b: int) -> int:
    """Sample b's iteration: one for the whole batch, or one per sample."""
    return value if isinstance(value, int) else value[b]
