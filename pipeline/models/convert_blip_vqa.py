"""Convert the original BLIP VQA checkpoint into a transformers model folder at its own 480 px.

``model_base_vqa_capfilt_large.pth`` (the checkpoint T2I-CompBench scores with) holds
``{"model": state_dict}`` with ``visual_encoder.*`` (timm-style ViT-B/16 at 480 px),
``text_encoder.*`` (BERT with cross-attention) and ``text_decoder.*`` (``bert.*`` + ``cls.*``).
The hub's ``Salesforce/blip-vqa-capfilt-large`` was resized to 384 px; this keeps 480, so the
scorer needs no position interpolation. The architecture is read from the tensor shapes
(attention heads, which shapes cannot tell, follow BLIP: 64 dimensions per head, unless
``base_config`` gives them). Read with ``torch.load(weights_only=True)``, written as safetensors.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.models import checkpoint_io as ckpt

# Original ViT name -> transformers BlipVisionModel name (same tensors, no reshaping).
_VISION_RULES = [
    *ckpt.VIT_RULES,
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision_model.encoder.layers.\1.self_attn.qkv."),
    (r"^visual_encoder\.norm\.(weight|bias)$", r"vision_model.post_layernorm.\1"),
]
# Buffers the original saves that transformers recomputes.
_IGNORED = re.compile(r"^text_(encoder|decoder\.bert)\.embeddings\.position_ids$")

_BLIP_HEAD_DIM = 64  # ViT-B/16 and BERT-base: 768 / 12
_VISION_EPS = 1e-6  # BLIP's timm ViT LayerNorm
_TEXT_EPS = 1e-12  # BLIP's med_config.json


def rename_key(key: str) -> str | None:
    """The transformers name of an original key; ``None`` for keys the conversion drops."""
    if _IGNORED.match(key):
        return None
    if key.startswith(("text_encoder.", "text_decoder.")):
        return key  # BLIP's med.py and transformers' BlipText share BERT's names
    for pattern, repl in _VISION_RULES:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key  # unknown: kept, so the key check below reports it


def _fail(path: Path, why: str) -> UserError:
    return UserError(f"{path}: not a BLIP VQA checkpoint ({why}); expected model_base_vqa_capfilt_large.pth")


def load_original(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict, read without running pickle code."""
    return ckpt.load_state_dict(path, partial(_fail, path))


def infer_config(state: dict[str, torch.Tensor], tokenizer: Any, path: Path, base: Any = None) -> Any:
    """A BlipConfig whose shapes are the checkpoint's; heads/eps from ``base`` or BLIP's defaults."""
    from transformers import BlipConfig

    fail = partial(_fail, path)
    dims = partial(ckpt.shape, state, fail=fail)  # the shape of a required tensor
    bv = base.vision_config if base is not None else None
    bt = base.text_config if base is not None else None
    vision = ckpt.vit_vision_config(state, fail, _BLIP_HEAD_DIM, _VISION_EPS, bv)
    width = vision["hidden_size"]
    vocab, hidden = dims("text_encoder.embeddings.word_embeddings.weight")
    enc_width = dims("text_encoder.encoder.layer.0.crossattention.self.key.weight")[1]
    if enc_width != width:
        raise _fail(path, f"text encoder cross-attends to width {enc_width}, vision width is {width}")
    text_layers = ckpt.depth(state, "text_encoder.encoder.layer.")
    if ckpt.depth(state, "text_decoder.bert.encoder.layer.") != text_layers:
        raise _fail(path, "text encoder and decoder have different depths")
    if base is None and (width % _BLIP_HEAD_DIM or hidden % _BLIP_HEAD_DIM):
        raise UserError(
            f"{path}: widths {width}/{hidden} are not BLIP's 64-per-head layout; pass base_config "
            "(a BLIP config folder) to give the attention heads"
        )
    text = dict(
        vocab_size=vocab, hidden_size=hidden, encoder_hidden_size=enc_width, num_hidden_layers=text_layers,
        intermediate_size=dims("text_encoder.encoder.layer.0.intermediate.dense.weight")[0],
        max_position_embeddings=dims("text_encoder.embeddings.position_embeddings.weight")[0],
        num_attention_heads=bt.num_attention_heads if bt else hidden // _BLIP_HEAD_DIM,
        layer_norm_eps=bt.layer_norm_eps if bt else _TEXT_EPS,
        bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"), pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id,
    )
    return BlipConfig(vision_config=vision, text_config=text)


def load_tokenizer(source: Path | None) -> Any:
    """bert-base-uncased plus BLIP's [DEC] (bos) and [ENC], added in BLIP's order."""
    return ckpt.load_bert_tokenizer(
        source, [("bos_token", "[DEC]"), ("additional_special_tokens", "[ENC]")], present=ckpt.in_vocab
    )


def _base_config(base_config: str | Path | None) -> Any:
    if base_config is None:
        return None
    from transformers import BlipConfig

    return ckpt.read_base_config(base_config, BlipConfig, "BLIP")


def build_model(state: dict[str, torch.Tensor], config: Any, path: Path) -> Any:
    """A BlipForQuestionAnswering holding the checkpoint's tensors; every key must map.

    Under ``torch.device("meta")`` this checks a full-size key set without allocating memory."""
    from transformers import BlipForQuestionAnswering

    mapped = {new: v for k, v in state.items() if (new := rename_key(k)) is not None}
    model = BlipForQuestionAnswering(config)
    ckpt.check_keys(mapped, model.state_dict(), partial(_fail, path))
    model.load_state_dict(mapped, strict=True)
    return model


def convert_blip_vqa(
    checkpoint: Path, output: Path, tokenizer: Path | None = None, *, base_config: str | Path | None = None
) -> Path:
    """Write a BlipForQuestionAnswering folder (config, safetensors, tokenizer) to ``output``."""
    checkpoint, output = Path(checkpoint), Path(output)
    ckpt.ensure_new_output(output)
    state = load_original(checkpoint)
    tok = load_tokenizer(tokenizer)
    config = infer_config(state, tok, checkpoint, _base_config(base_config))
    if len(tok) != config.text_config.vocab_size:
        raise UserError(
            f"tokenizer has {len(tok)} tokens but the checkpoint's vocabulary has {config.text_config.vocab_size}; "
            "use bert-base-uncased (BLIP adds [DEC] and [ENC] to it)"
        )
    model = build_model(state, config, checkpoint)
    ckpt.write_atomically(output, {"": model}, tok)
    return output
