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

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError

# Original ViT name -> transformers BlipVisionModel name (same tensors, no reshaping).
_VISION_RULES = [
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.(weight|bias)$", r"vision_model.embeddings.patch_embedding.\1"),
    (r"^visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision_model.encoder.layers.\1.self_attn.qkv."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.", r"vision_model.encoder.layers.\1.mlp.\2."),
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
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable / unsafe file is the user's input problem
        raise _fail(path, f"cannot be read as a weights-only torch file: {type(err).__name__}") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _fail(path, "no 'model' state dict of tensors")
    return state


def _layers(state: dict[str, torch.Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _shape(state: dict[str, torch.Tensor], key: str, path: Path) -> tuple[int, ...]:
    if key not in state:
        raise _fail(path, f"missing {key}")
    return tuple(state[key].shape)


def infer_config(state: dict[str, torch.Tensor], tokenizer: Any, path: Path, base: Any = None) -> Any:
    """A BlipConfig whose shapes are the checkpoint's; heads/eps from ``base`` or BLIP's defaults."""
    from transformers import BlipConfig

    width, _, patch, _ = _shape(state, "visual_encoder.patch_embed.proj.weight", path)
    positions = _shape(state, "visual_encoder.pos_embed", path)[1]
    grid = int(round((positions - 1) ** 0.5))
    if grid * grid != positions - 1:
        raise _fail(path, f"pos_embed has {positions} positions, not a square grid plus [CLS]")
    vocab, hidden = _shape(state, "text_encoder.embeddings.word_embeddings.weight", path)
    enc_width = _shape(state, "text_encoder.encoder.layer.0.crossattention.self.key.weight", path)[1]
    if enc_width != width:
        raise _fail(path, f"text encoder cross-attends to width {enc_width}, vision width is {width}")
    text_layers = _layers(state, "text_encoder.encoder.layer.")
    if _layers(state, "text_decoder.bert.encoder.layer.") != text_layers:
        raise _fail(path, "text encoder and decoder have different depths")
    bv = base.vision_config if base is not None else None
    bt = base.text_config if base is not None else None
    if base is None and (width % _BLIP_HEAD_DIM or hidden % _BLIP_HEAD_DIM):
        raise UserError(
            f"{path}: widths {width}/{hidden} are not BLIP's 64-per-head layout; pass base_config "
            "(a BLIP config folder) to give the attention heads"
        )
    vision = dict(
        hidden_size=width, image_size=grid * patch, patch_size=patch,
        intermediate_size=_shape(state, "visual_encoder.blocks.0.mlp.fc1.weight", path)[0],
        num_hidden_layers=_layers(state, "visual_encoder.blocks."),
        num_attention_heads=bv.num_attention_heads if bv else width // _BLIP_HEAD_DIM,
        layer_norm_eps=bv.layer_norm_eps if bv else _VISION_EPS,
    )
    text = dict(
        vocab_size=vocab, hidden_size=hidden, encoder_hidden_size=enc_width, num_hidden_layers=text_layers,
        intermediate_size=_shape(state, "text_encoder.encoder.layer.0.intermediate.dense.weight", path)[0],
        max_position_embeddings=_shape(state, "text_encoder.embeddings.position_embeddings.weight", path)[0],
        num_attention_heads=bt.num_attention_heads if bt else hidden // _BLIP_HEAD_DIM,
        layer_norm_eps=bt.layer_norm_eps if bt else _TEXT_EPS,
        bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"), pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id, eos_token_id=tokenizer.sep_token_id,
    )
    return BlipConfig(vision_config=vision, text_config=text)


def _load_tokenizer(source: Path | None) -> Any:
    """bert-base-uncased plus BLIP's [DEC] (bos) and [ENC], added in BLIP's order."""
    from transformers import AutoTokenizer

    name = str(source) if source is not None else "bert-base-uncased"
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except OSError:
        raise UserError(
            f"cannot load the tokenizer {name!r}; pass --tokenizer DIR (a bert-base-uncased folder) "
            "or put bert-base-uncased in the Hugging Face cache (HF_HOME) and run with HF_HUB_OFFLINE=1"
        ) from None
    if "[DEC]" not in tok.get_vocab():
        tok.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def _check_keys(mapped: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path) -> None:
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise _fail(path, "; ".join(parts))
    for key, value in mapped.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise _fail(path, f"{key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")


def _base_config(base_config: str | Path | None) -> Any:
    if base_config is None:
        return None
    from transformers import BlipConfig

    try:
        return BlipConfig.from_pretrained(str(base_config))
    except OSError:
        raise UserError(f"cannot read a BLIP config from {base_config}") from None


def convert_blip_vqa(
    checkpoint: Path, output: Path, tokenizer: Path | None = None, *, base_config: str | Path | None = None
) -> Path:
    """Write a BlipForQuestionAnswering folder (config, safetensors, tokenizer) to ``output``."""
    from transformers import BlipForQuestionAnswering

    checkpoint, output = Path(checkpoint), Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"output {output} already exists and is not empty; choose a new folder")
    state = load_original(checkpoint)
    tok = _load_tokenizer(tokenizer)
    config = infer_config(state, tok, checkpoint, _base_config(base_config))
    if len(tok) != config.text_config.vocab_size:
        raise UserError(
            f"tokenizer has {len(tok)} tokens but the checkpoint's vocabulary has {config.text_config.vocab_size}; "
            "use bert-base-uncased (BLIP adds [DEC] and [ENC] to it)"
        )
    mapped = {new: v for k, v in state.items() if (new := rename_key(k)) is not None}
    model = BlipForQuestionAnswering(config)
    _check_keys(mapped, model.state_dict(), checkpoint)
    model.load_state_dict(mapped, strict=True)
    _write_atomically(model, tok, output)
    return output


def _write_atomically(model: Any, tok: Any, output: Path) -> None:
    """Save into a temporary sibling folder, then rename: a crash never leaves half a model."""
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.save_pretrained(work, safe_serialization=True)
        tok.save_pretrained(work)
        if output.exists():
            output.rmdir()  # empty (checked above)
        os.rename(work, output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
