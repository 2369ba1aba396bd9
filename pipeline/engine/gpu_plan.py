"""What the engine does on a GPU to keep it busy and within memory: a view chunk from the device's free memory,
frozen weights cast once, and the passes worth compiling.

- ``plan_view_chunk``: the largest view chunk that divides every referee pass's rows (so every chunk has the
  same shape: a compiled ViT is traced once) and whose activations fit the free memory, less a headroom and
  the batch's VAE-decoder and autocast-copy memory. A pure function of the numbers given (engine.memory_*).
- ``cast_frozen_weights``: Linear / Conv / Embedding weights stored in bf16 once (autocast otherwise re-casts
  every frozen float32 weight on every pass), norms kept in float32 (autocast runs them in float32).
- ``compile_blocks``: each transformer block compiled on its own with static shapes (a 39-block ViT-g traces
  one block shape, not one giant graph; embeddings and the final norm stay eager).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

GIB = 2**30
_CAST = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Embedding)


@dataclass(frozen=True)
class ChunkPlan:
    view_chunk: int  # views per referee pass; 0 = all rows at once
    rows: tuple[int, ...]  # the referee passes' row counts it divides
    activations_gib: float  # the chunk's estimated activation memory
    fixed_gib: float  # VAE decoder + autocast copies + headroom, reserved first
    free_gib: float
    fits: bool  # False: even one view does not fit the estimate (the OOM fallback is the last resort)

    def describe(self) -> str:
        chunk = "all" if self.view_chunk == 0 else str(self.view_chunk)
        return (f"view_chunk {chunk} of {max(self.rows)} rows: ~{self.activations_gib:.1f} GiB activations + "
                f"{self.fixed_gib:.1f} GiB reserved of {self.free_gib:.1f} GiB free" + ("" if self.fits else
                                                                                        " (does not fit)"))


def divisors(n: int) -> list[int]:
    """Divisors of n, largest first."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)}, reverse=True)


def plan_view_chunk(free_gib: float, batch: int, views: int, keep: int, per_view_gib: float,
                    per_image_gib: float, autocast_copies_gib: float, headroom_gib: float) -> ChunkPlan:
    """The view chunk for ``batch`` samples of ``views`` views (``keep`` < views: the hardest ``keep`` go
    through the gradient pass, all ``views`` through the no-grad selection pass)."""
    rows = (batch * views,) if not 0 < keep < views else (batch * views, batch * keep)
    common = math.gcd(*rows)
    fixed = batch * per_image_gib + autocast_copies_gib + headroom_gib
    budget = free_gib - fixed
    for chunk in divisors(common):
        if chunk * per_view_gib <= budget:
            return ChunkPlan(0 if chunk == max(rows) else chunk, rows, chunk * per_view_gib, fixed, free_gib, True)
    return ChunkPlan(1, rows, per_view_gib, fixed, free_gib, False)


def cast_frozen_weights(modules: Iterable[nn.Module], dtype: torch.dtype = torch.bfloat16) -> int:
    """Store the weights and biases of every Linear / Conv / Embedding in ``dtype`` (norms stay float32);
    returns the number of tensors cast. For frozen models run under autocast of the same dtype only."""
    cast = 0
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, _CAST):
                for p in list(sub.parameters(recurse=False)):
                    if p.dtype.is_floating_point and p.dtype != dtype:
                        p.data = p.data.to(dtype)
                        cast += 1
    return cast


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a vision tower (transformers: ``encoder.layers`` or ``encoder.layer``)."""
    encoder = getattr(model, "encoder", None)
    blocks = getattr(encoder, "layers", None) or getattr(encoder, "layer", None)
    return list(blocks) if blocks is not None else []


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Compile each block's forward on its own, static shapes; once per model (the model may be shared)."""
    if getattr(model, "_referee_synth_compiled", False):
        return 0
    blocks = transformer_blocks(model)
    for block in blocks:
        block.forward = torch.compile(block.forward, dynamic=False, backend=backend)
    model._referee_synth_compiled = True
    return len(blocks)
