"""The BLIP-2 stage-1 caption (LM) head that transformers' BLIP-2 lacks.

It is BERT's LM prediction head: dense -> GELU -> LayerNorm -> decoder (+ bias). In the LAVIS
checkpoint its weights are ``Qformer.cls.predictions.*``. Saved and loaded as its own small
``PreTrainedModel`` (sub-folder ``caption_head`` of the referee folder), so it goes through the
same ``from_pretrained`` path as every other model.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class Blip2CaptionHeadConfig(PretrainedConfig):
    model_type = "blip2_caption_head"

    def __init__(self, hidden_size: int = 768, vocab_size: int = 30523, layer_norm_eps: float = 1e-12, **kwargs):
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.layer_norm_eps = layer_norm_eps
        super().__init__(**kwargs)


class Blip2CaptionHead(PreTrainedModel):
    config_class = Blip2CaptionHeadConfig
    base_model_prefix = "caption_head"

    def __init__(self, config: Blip2CaptionHeadConfig):
        super().__init__(config)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.dense(hidden_states))
        return self.decoder(self.layer_norm(h))
