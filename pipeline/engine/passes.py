"""What the engines share about running a pass: autocast, view chunks, and the paper's gradient balance.

The inversion engine, the referee zoo and plain sampling each run model passes under the same
``engine.autocast`` rule and split view rows by the same ``engine.view_chunk``; the referee gradient
is rescaled per sample to ``ratio`` x its SDS gradient norm (the paper's balance) in one place.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(mode: str, device: torch.device) -> AbstractContextManager:
    """``engine.autocast``: none; auto = bf16 on CUDA only; bf16 or fp16 on any device."""
    if mode == "none" or (mode == "auto" and device.type != "cuda"):
        return nullcontext()
    return torch.autocast(device.type, dtype=_AUTOCAST_DTYPES.get(mode, torch.bfloat16))


def view_chunks(n: int, size: int) -> list[slice]:
    """Slices of at most ``size`` rows over ``n`` (0 = all at once)."""
    size = size if size > 0 else n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1)


def balance_gradients(g_ref: torch.Tensor, g_sds: torch.Tensor, ratio: float) -> torch.Tensor:
    """Rescale each sample's referee gradient to ``ratio`` times its own SDS gradient norm."""
    ref_norm, sds_norm = per_sample_norm(g_ref), per_sample_norm(g_sds)
    scale = torch.where(ref_norm > 0, ratio * sds_norm / ref_norm.clamp_min(torch.finfo(ref_norm.dtype).tiny), 0.0)
    return g_ref * scale.view(-1, *([1] * (g_ref.dim() - 1)))
