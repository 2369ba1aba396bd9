"""Which CPU kernels computed this process's floats, for tests that pin bytes recorded earlier.

A float32 result's last bits depend on the torch build, on ATen's CPU capability (``ATEN_CPU_CAPABILITY``,
``torch.backends.cpu.get_cpu_capability()``), on oneDNN's instruction set (the CPU's, capped by
``ONEDNN_MAX_CPU_ISA``; convolutions run there) and on the thread count: ATen's capability alone does not
decide it (measured: ``ATEN_CPU_CAPABILITY=avx2`` on an AVX-512 CPU gives other bytes than an AVX2-only CPU;
adding ``ONEDNN_MAX_CPU_ISA=AVX2`` gives that CPU's bytes exactly). So a digest is recorded per *kernel
probe*: a hash of a few kernels' outputs on fixed inputs (convolution, matrix product, softmax, norms,
transcendental functions, a long threaded sum), taken at the test's thread count. Where no digest was
recorded for this probe the test skips and names the capability, threads and probe; it never compares bytes
made by other kernels. See docs/REPRODUCIBILITY.md.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
import torch.nn.functional as F


def kernel_probe() -> str:
    """12 hex digits that change whenever the kernels used here round differently."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 24, 24, generator=g)
    a, b = torch.randn(96, 384, generator=g), torch.randn(384, 80, generator=g)
    q = torch.randn(1, 4, 64, 32, generator=g)
    long = torch.randn(1 << 20, generator=g)
    with torch.no_grad():
        outs = [
            F.conv2d(x, torch.randn(32, 16, 3, 3, generator=g), padding=1),
            a @ b,
            F.linear(a, b.T.contiguous()),
            torch.softmax(a, dim=-1), torch.log_softmax(a, dim=0),
            F.layer_norm(a, (384,)), F.group_norm(x, 4),
            F.gelu(a), F.silu(a), torch.exp(a), torch.tanh(a),
            F.scaled_dot_product_attention(q, q, q),
            F.interpolate(x, size=(31, 31), mode="bicubic", align_corners=False),
            long.sum(), long.norm(), long.cumsum(0)[-1:],
        ]
    h = hashlib.sha256()
    for t in outs:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def kernels() -> str:
    """This process's kernel path as one line (torch build, ATen capability, oneDNN cap, threads, probe)."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "native")
    return (f"torch {torch.__version__}, ATen {torch.backends.cpu.get_cpu_capability()}, oneDNN {isa}, "
            f"{torch.get_num_threads()} thread(s), probe {kernel_probe()}")


def recorded_digest(table: dict[str, str], what: str, got: str) -> str:
    """The digest ``table`` (``"<torch version> <threads> <probe>" -> sha256``) holds for this process's
    kernels; skips, naming them and the digest ``got`` here (to record it), where none was recorded."""
    key = f"{torch.__version__} {torch.get_num_threads()} {kernel_probe()}"
    if key not in table:
        pytest.skip(f"{what}: no digest recorded for these kernels ({kernels()}); recorded for "
                    f"{len(table)} kernel paths, see docs/REPRODUCIBILITY.md; here {key!r}: {got!r}")
    return table[key]
