"""The referee protocol: what the inversion engine asks of any frozen model that judges an image.

A referee
- encodes a batch's prompts once per optimisation (``encode``; implementations cache per prompt) and says
  which prompts it cannot judge (``EncodedPrompts.skipped``: they get zero weight from it, recorded);
- gives a differentiable loss per row, one row = one augmented view of one sample with its prompt
  (``losses``; lower = better match), on views at its own ``image_size`` made by ``resize`` then the
  engine's augmentations and normalisation;
- turns the losses of the final, un-augmented image into a scalar match score (``match``).

Implementations live beside this file; ``registry.py`` maps a config's ``kind`` to them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from pipeline.config import Config, RefereeSpec
from pipeline.pooling import pool_to


class Rows(Protocol):
    """Per-prompt text data, one row per image; rows are picked and repeated as views are laid out."""

    def select(self, rows: torch.Tensor | slice | list[int]) -> Rows: ...

    def repeat_rows(self, times: int) -> Rows: ...


@dataclass
class TensorRows:
    """Rows held as tensors that share their first dimension (embeddings, codes)."""

    tensors: dict[str, torch.Tensor]

    def select(self, rows: torch.Tensor | slice | list[int]) -> TensorRows:
        return TensorRows({k: v[rows] for k, v in self.tensors.items()})

    def repeat_rows(self, times: int) -> TensorRows:
        return TensorRows({k: v.repeat_interleave(times, 0) for k, v in self.tensors.items()})

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]


@dataclass
class EncodedPrompts:
    rows: Any  # a Rows: one row per prompt of the batch
    skipped: list[str | None]  # per prompt: why this referee cannot judge it (None: it can)


@dataclass
class ViewLosses:
    """Per-row losses, float32 [n]: ``total`` is what is minimised, ``parts`` its named pieces."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class RefereeContext:
    """What a referee is built from: the run's config, its own entry, the engine's loaded model set."""

    cfg: Config
    spec: RefereeSpec
    models: Any  # GeneratorModels (device, dtype, the BLIP-2 referee)
    blip2: Any  # the engine's pipeline.referees.blip2.Referee (shared, so its text cache is too)
    model_id: str  # spec.model or the kind's default


class ZooReferee(ABC):
    kind: ClassVar[str]
    image_size: int

    def __init__(self, ctx: RefereeContext) -> None:
        self.name = ctx.spec.name or ctx.spec.kind
        self.device: torch.device = ctx.models.device
        self.source = ctx.model_id

    def _adopt(self, zoo: Any) -> None:
        """Take a loaded CLIP-family model (a ``ZooModel``): model, tokenizer, source, input side, text length."""
        self.model, self.tokenizer, self.source = zoo.model, zoo.tokenizer, zoo.source
        self.image_size = self.model.config.vision_config.image_size
        self._max_tokens = self.model.config.text_config.max_position_embeddings

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, 3, S, S] before augmentation: the authors' avg + max pool."""
        return pool_to(images, self.image_size)

    @abstractmethod
    def encode(self, prompts: Sequence[str]) -> EncodedPrompts: ...

    @abstractmethod
    def losses(self, pixels: torch.Tensor, rows: Any) -> ViewLosses:
        """Per-row losses of normalised views [n, 3, S, S] with their prompts' rows (differentiable)."""

    @abstractmethod
    def match(self, losses: ViewLosses) -> torch.Tensor:
        """[n] match score of each row (the final, un-augmented image), higher = better."""
