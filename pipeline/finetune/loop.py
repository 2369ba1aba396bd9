"""The training step and its resumable state (one process; several through torch.distributed).

Gradients are averaged across processes by one all-reduce of the flattened LoRA gradients (no DDP
wrapper: the text-encoder LoRA is where DDP's bucket bookkeeping fails in diffusers' scripts). Then
GORS's clip over UNet + text-encoder LoRA parameters and AdamW with two parameter groups at a constant
learning rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.config import FinetuneConfig
from pipeline.finetune.lora import load_into, lora_state, trainable
from pipeline.finetune.loss import DiffusionParts, training_loss


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class FinetuneLoop:
    def __init__(self, parts: DiffusionParts, fcfg: FinetuneConfig) -> None:
        self.parts, self.fcfg = parts, fcfg
        self.rank, self.world = _world()
        self.unet_params = trainable(parts.unet)
        self.text_params = trainable(parts.text_encoder) if fcfg.train_text_encoder else []
        groups = [{"params": self.unet_params, "lr": fcfg.lr_unet}]
        if self.text_params:
            groups.append({"params": self.text_params, "lr": fcfg.lr_text})
        self.optimizer = torch.optim.AdamW(groups, betas=tuple(fcfg.betas), weight_decay=fcfg.weight_decay,
                                           eps=fcfg.eps)
        self.step = 0
        self.seconds = 0.0  # wall time of the steps so far, over every resume (the card's training cost)
        self.history: list[list[float]] = []  # [step, loss (mean over all processes)]
        parts.unet.train()
        parts.text_encoder.train(fcfg.train_text_encoder)
        if fcfg.gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing()
            if fcfg.train_text_encoder:
                parts.text_encoder.gradient_checkpointing_enable()

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self.unet_params + self.text_params

    def indices(self, size: int) -> list[int]:
        """Places of this rank's samples in the global batch (rank-interleaved, as the data split is)."""
        return [self.rank + j * self.world for j in range(size)]

    def compute_gradients(self, images: torch.Tensor, captions: Sequence[str], rewards: torch.Tensor) -> float:
        """Zero, forward, backward and average the gradients over processes; returns the global loss."""
        self.optimizer.zero_grad(set_to_none=False)
        loss, _ = training_loss(self.parts, images, captions, rewards, self.fcfg.seed, self.step,
                                self.indices(len(captions)))
        loss.backward()
        return self._all_reduce(loss.detach())

    def _all_reduce(self, loss: torch.Tensor) -> float:
        if self.world == 1:
            return float(loss)
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1).to(grads[0])])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).clone()
            offset += n
        return float(flat[-1])

    def train_step(self, images: torch.Tensor, captions: Sequence[str], rewards: torch.Tensor) -> float:
        loss = self.compute_gradients(images, captions, rewards)
        if self.fcfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.fcfg.max_grad_norm)
        self.optimizer.step()
        self.step += 1
        self.history.append([self.step, loss])
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seconds": self.seconds, "optimizer": self.optimizer.state_dict(),
                "history": self.history,
                "lora": lora_state(self.parts.unet, self.parts.text_encoder, self.fcfg.train_text_encoder)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_into(self.parts.unet, self.parts.text_encoder, state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.seconds = float(state.get("seconds", 0.0))
        self.history = [list(h) for h in state["history"]]
