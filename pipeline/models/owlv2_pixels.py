"""OWLv2's image preprocessing in torch (its transformers processor needs scipy, which is not installed).

Pad to a square at the bottom/right with grey, then resize to the detector's input side (bilinear,
antialiased when shrinking). Differentiable, so the detection referee and the spatial scorer share it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OWL_PAD_VALUE = 0.5  # the original OWLv2's grey (transformers 4.x too; 5.x pads with 0)


def pad_resize(images: torch.Tensor, size: int, pad_value: float = OWL_PAD_VALUE) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> ``[B, 3, size, size]``: padded square, then resized."""
    h, w = images.shape[-2:]
    side = max(h, w)
    if (h, w) != (side, side):
        images = F.pad(images, (0, side - w, 0, side - h), value=pad_value)
    if side == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=side > size)
