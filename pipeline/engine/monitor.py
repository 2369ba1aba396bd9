"""In-loop monitoring of an inversion: what a check records, when a sample exits, which iterate wins.

Every ``monitor.every`` referee iterations the current latents of a sample are decoded and scored by a
``MonitorFn`` (the shard processor gives the run's own scorer for the sample's category, on the image as
it would be stored, with the sample's filter threshold). Per sample:

- trace: (iteration, score) of every check;
- early exit (``monitor.early_exit``): a score above threshold + ``margin`` at ``patience`` consecutive
  checks (from ``min_iterations`` on) ends the sample's referee phase there; it then runs the run's
  SDS-only tail (``optim.tail_iterations``, the same steps as the tail of a full run) and leaves the batch;
- best iterate (``monitor.best_iterate``): the best-scored checked image is kept, so the caller can store
  it instead of the final image when it scored higher.

The engine stays free of scoring: it knows a score and a threshold, never a scorer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.config import MonitorConfig

EXIT_COMPLETED = "completed"  # ran every iteration
EXIT_EARLY = "early_exit"  # left after clearing its threshold (then the SDS tail)
EXIT_FAILED = "failed"  # gave up after restarts
EXIT_REASONS = (EXIT_COMPLETED, EXIT_EARLY, EXIT_FAILED)


@dataclass
class MonitorScore:
    """One check of one sample: its score, its filter threshold (None: never exits, e.g. an unscorable
    prompt) and anything the caller wants back with the best iterate (the stored bytes, the judgement)."""

    score: float
    threshold: float | None
    payload: Any = None


# (images [n, 3, H, W] float32 in [0, 1] on the CPU, their requests) -> one MonitorScore each
MonitorFn = Callable[[torch.Tensor, Sequence[Any]], list[MonitorScore]]


@dataclass
class MonitorBest:
    """The best-scored checked iterate of a sample."""

    iteration: int  # referee iterations done when it was checked
    score: float
    image: torch.Tensor  # 3xHxW float32 in [0, 1], CPU
    payload: Any = None


@dataclass
class SampleMonitor:
    """One sample's checks: trace, streak of clearing checks, best iterate."""

    cfg: MonitorConfig
    iterations: int  # the run's referee iterations (optim.iterations)
    trace: list[dict[str, float]] = field(default_factory=list)
    streak: int = 0
    best: MonitorBest | None = None

    def due(self, done: int) -> bool:
        """A check after ``done`` referee iterations?"""
        return 0 < done <= self.iterations and done % self.cfg.every == 0

    def observe(self, done: int, check: MonitorScore, image: torch.Tensor) -> bool:
        """Record one check; True when the sample should exit now."""
        self.trace.append({"iteration": done, "score": float(check.score)})
        if self.cfg.best_iterate and (self.best is None or check.score > self.best.score):
            self.best = MonitorBest(done, float(check.score), image, check.payload)
        clears = check.threshold is not None and check.score > check.threshold + self.cfg.margin
        self.streak = self.streak + 1 if clears else 0
        return (self.cfg.early_exit and self.streak >= self.cfg.patience and done >= self.cfg.min_iterations
                and done < self.iterations)
