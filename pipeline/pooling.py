"""Resizing an image batch by pooling, as the authors' cutouts do: shared by the views (engine) and the
referees that pool a whole image to their input size."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pool_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """(adaptive avg pool + adaptive max pool) / 2 of the whole image (the authors' cutouts)."""
    return (F.adaptive_avg_pool2d(images, size) + F.adaptive_max_pool2d(images, size)) / 2
