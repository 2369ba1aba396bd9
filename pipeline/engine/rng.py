"""Per-sample random streams.

Every random draw of the engine comes from a generator seeded by (sample seed, stream name,
iteration), never from a shared global state, so a sample's draws do not depend on which other
samples share its batch, nor on how many draws they made. Seeds are derived with SHA-256 (stable
across processes and Python versions, unlike ``hash()``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

_SEED_BITS = 63  # fits an int64 column and every torch generator


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (their ``str``), the same everywhere."""
    blob = "\x1f".join(str(p) for p in parts).encode()
    digest = hashlib.sha256(blob).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << _SEED_BITS) - 1)


def generator(seed: int, *stream: object, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator on ``device`` for one (seed, stream...) pair."""
    gen = torch.Generator(device=device)
    gen.manual_seed(stable_seed(seed, *stream))
    return gen


@contextmanager
def seeded_global_cpu_rng(seed: int, *stream: object) -> Iterator[None]:
    """Run code that draws from torch's global CPU RNG (kornia's parameter samplers) with a
    private seed, and leave the global state as it was afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(stable_seed(seed, *stream))
        yield


def initial_latents(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    """z0 per sample from its own "latent-init" stream, drawn on the CPU (the same start on every device)."""
    return torch.stack([torch.randn(shape, generator=generator(seed, "latent-init")) for seed in seeds])
