"""Augmented referee views of an image (the paper's augmentation regularisation).

Each view is (adaptive avg pool + adaptive max pool) / 2 of the whole image at the referee's
input size, then kornia RandomAffine (per-axis translate), RandomPerspective, ColorJitter,
RandomErasing (one rectangle shared by an image's views when ``erase_same_on_views``), then
Gaussian noise twice (per-view std ~ U(0, noise_std_max), then std noise_std), then CLIP
normalisation. Everything is differentiable with respect to the image and runs in float32
(kornia's HSV path gives NaN in fp16 on black pixels).

kornia samples its parameters from torch's global CPU RNG. To make a sample's views depend only
on its own seed and the iteration, parameters are drawn per sample under a private seed
(``seeded_global_cpu_rng``) and passed to kornia explicitly; the noises come from a per-sample
generator on the image's device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import kornia.augmentation as K
import torch
from torch import nn

from pipeline.config import AugmentConfig
from pipeline.engine.rng import generator, seeded_global_cpu_rng
from pipeline.pooling import pool_to


class ViewAugmenter(nn.Module):
    """``stream`` names the random streams apart (one augmenter per zoo referee; "" = the paper's);
    ``resize`` brings the image to the views' size (default: the authors' avg + max pool)."""

    def __init__(self, cfg: AugmentConfig, image_size: int, num_views: int = 0, stream: str = "",
                 resize: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.size = image_size
        self.num_views = num_views or cfg.num_views
        self.stream = stream
        self._resize = resize
        tx, ty = cfg.affine_translate
        self.ops = nn.ModuleList(
            [
                K.RandomAffine(degrees=cfg.affine_degrees, translate=(tx, ty), padding_mode="zeros", p=1.0),
                K.RandomPerspective(distortion_scale=cfg.perspective_distortion, p=cfg.perspective_p),
                K.ColorJitter(
                    cfg.jitter_brightness, cfg.jitter_contrast, cfg.jitter_saturation, cfg.jitter_hue,
                    p=cfg.jitter_p,
                ),
                # kornia sees one image's N views as its batch (see forward), so same_on_batch shares
                # one rectangle among those views and never across samples.
                K.RandomErasing(
                    scale=tuple(cfg.erasing_scale), ratio=tuple(cfg.erasing_ratio), p=cfg.erasing_p,
                    same_on_batch=cfg.erase_same_on_views,
                ),
            ]
        )
        self.register_buffer("mean", torch.tensor(cfg.clip_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.clip_std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP normalisation of [..., 3, S, S] images in [0, 1]."""
        shape = images.shape
        flat = images.reshape(-1, *shape[-3:])
        out = (flat - self.mean.to(flat.device)) / self.std.to(flat.device)
        return out.reshape(shape)

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        return pool_to(images, self.size) if self._resize is None else self._resize(images)

    def plain(self, images: torch.Tensor) -> torch.Tensor:
        """The un-augmented referee input: pooled to S and CLIP-normalised ([B, 3, S, S])."""
        with torch.autocast(images.device.type, enabled=False):
            return self.normalize(self.resize(images.float()))

    def _kornia(self, views: torch.Tensor, seed: int, iteration: int) -> torch.Tensor:
        with seeded_global_cpu_rng(seed, "augment" + self.stream, iteration):
            params = [op.forward_parameters(views.shape) for op in self.ops]
        for op, p in zip(self.ops, params):
            views = op(views, params=p)
        return views

    def _noise(self, views: torch.Tensor, seed: int, iteration: int) -> torch.Tensor:
        gen = generator(seed, "augment-noise" + self.stream, iteration, device=views.device)
        n = views.shape[0]
        stds = torch.rand(n, 1, 1, 1, generator=gen, device=views.device) * self.cfg.noise_std_max
        views = views + stds * torch.randn(views.shape, generator=gen, device=views.device)
        return views + self.cfg.noise_std * torch.randn(views.shape, generator=gen, device=views.device)

    def forward(self, images: torch.Tensor, seeds: Sequence[int], iteration: int | Sequence[int]) -> torch.Tensor:
        """[B, 3, H, W] images in [0, 1] -> [B, N, 3, S, S] CLIP-normalised views (float32); ``iteration``
        for the batch or per sample."""
        with torch.autocast(images.device.type, enabled=False):
            pooled = self.resize(images.float())
            out = []
            for b, seed in enumerate(seeds):
                views = pooled[b : b + 1].expand(self.num_views, -1, -1, -1).contiguous()
                it = iteration if isinstance(iteration, int) else iteration[b]
                views = self._noise(self._kornia(views, seed, it), seed, it)
                out.append(views)
            return self.normalize(torch.stack(out))
