"""transformers BLIP / BLIP-2 vision names -> timm-style names (BLIP's ViT-B, LAVIS's EVA ViT-g), for
the converter tests' synthetic original checkpoints. Written independently of the converters' tables
(pipeline/models/checkpoint_io.py VIT_RULES) so that a wrong rule there cannot be mirrored here."""

from __future__ import annotations

import re

TO_TIMM_VIT = [
    (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm([12])\.", r"visual_encoder.blocks.\1.norm\2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"visual_encoder.blocks.\1.attn.qkv."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
]


def rename_first(key: str, rules: list[tuple[str, str]]) -> str:
    """``key`` renamed by the first rule that matches it (unchanged if none does)."""
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key
