"""A scorer stub with a known score trajectory, for the early-exit benchmarks only (never the product).

Sample ``prompt_id/sample_index`` scores below ``threshold + margin`` until its check number ``crossing``,
and above it from then on (linearly, 0.02 per check), so early exit with patience p must stop it at check
``crossing + p - 1``.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.engine.monitor import MonitorScore


class Trajectory:
    """The controlled case's scorer stub: sample i crosses ``threshold + margin`` at check ``crossing[i]``."""

    def __init__(self, crossing: dict[str, int], threshold: float, margin: float) -> None:
        self.crossing, self.threshold, self.margin = crossing, threshold, margin
        self.checks: dict[str, int] = {}

    def __call__(self, images: torch.Tensor, requests: list[Any]) -> list[MonitorScore]:
        out = []
        for r in requests:
            key = f"{r.prompt_id}/{r.sample_index}"
            self.checks[key] = self.checks.get(key, 0) + 1
            c = self.crossing[key]
            # linear: threshold + margin reached exactly at check c, 0.02 per check beyond it
            n = self.checks[key]
            score = self.threshold + self.margin + 0.02 * (n - c) + (0.001 if n >= c else -0.001)
            out.append(MonitorScore(score, self.threshold))
        return out
