"""What the original-checkpoint converters share: safe reading, ViT names and shapes, tokenizer, atomic writing.

Each converter words its own rejection (``fail(why)`` -> the ``UserError`` to raise), so the
helpers here only decide *when* a checkpoint is wrong, never how the message names it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError

Fail = Callable[[str], UserError]
# (tokenizer, special-token attribute, token) -> whether the token needs no adding.
Present = Callable[[Any, str, str], bool]

# timm-style ViT names (BLIP's ViT-B, LAVIS's EVA ViT-g) -> transformers BLIP / BLIP-2 vision names, same
# tensors. The patterns are disjoint, so order is free; each converter adds its own qkv and final-norm rules.
VIT_RULES: list[tuple[str, str]] = [
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.(weight|bias)$", r"vision_model.embeddings.patch_embedding.\1"),
    (r"^visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.", r"vision_model.encoder.layers.\1.mlp.\2."),
]


def load_state_dict(path: Path, fail: Fail) -> dict[str, torch.Tensor]:
    """The checkpoint's ``{"model": state_dict}`` (or a bare state dict), read without running pickle code."""
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable / unsafe file is the user's input problem
        raise fail(f"cannot be read as a weights-only torch file: {type(err).__name__}") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise fail("no 'model' state dict of tensors")
    return state


def shape(state: Mapping[str, torch.Tensor], key: str, fail: Fail) -> tuple[int, ...]:
    """The shape of a tensor the architecture is read from; a missing one means a foreign checkpoint."""
    if key not in state:
        raise fail(f"missing {key}")
    return tuple(state[key].shape)


def vit_geometry(state: Mapping[str, torch.Tensor], fail: Fail) -> tuple[int, int, int]:
    """(width, image size, patch size) of the ViT: the patch conv and the position table fix them."""
    width, _, patch, _ = shape(state, "visual_encoder.patch_embed.proj.weight", fail)
    positions = shape(state, "visual_encoder.pos_embed", fail)[1]
    grid = int(round((positions - 1) ** 0.5))
    if grid * grid != positions - 1:
        raise fail(f"pos_embed has {positions} positions, not a square grid plus [CLS]")
    return width, grid * patch, patch


def layer_indices(state: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    """The sorted N of the ``prefix{N}.`` keys: depth is only visible as numbered key prefixes."""
    return sorted({int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})


def depth(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Depth as highest layer index + 1 (0 when there are none); a gap surfaces in ``check_keys``."""
    found = layer_indices(state, prefix)
    return found[-1] + 1 if found else 0


def vit_vision_config(state: Mapping[str, torch.Tensor], fail: Fail, head_dim: int, eps: float,
                      base: Any = None) -> dict[str, Any]:
    """The vision-config fields of a timm-style ViT (BLIP's ViT-B, EVA ViT-g) read off its tensors;
    heads and LayerNorm eps from ``base`` (a vision config) when given, else the family's."""
    width, image_size, patch = vit_geometry(state, fail)
    return dict(
        hidden_size=width, image_size=image_size, patch_size=patch,
        intermediate_size=shape(state, "visual_encoder.blocks.0.mlp.fc1.weight", fail)[0],
        num_hidden_layers=depth(state, "visual_encoder.blocks."),
        num_attention_heads=base.num_attention_heads if base is not None else width // head_dim,
        layer_norm_eps=base.layer_norm_eps if base is not None else eps,
    )


def check_keys(
    mapped: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], fail: Fail, what: str = "keys"
) -> None:
    """Refuse before ``load_state_dict``, whose multi-line error would not reach the user as one line.

    ``what`` names the key set in the message ("referee keys" -> "3 referee keys missing, ...").
    """
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} {what} missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise fail("; ".join(parts))
    for key, value in mapped.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise fail(f"{key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")


def read_base_config(source: str | Path, config_cls: Any, kind: str) -> Any:
    """A transformers config read from a folder (``config_cls.from_pretrained``); ``kind`` names it in errors."""
    try:
        return config_cls.from_pretrained(str(source))
    except OSError:
        raise UserError(f"cannot read a {kind} config from {source}") from None


def is_set_as(tok: Any, attr: str, token: str) -> bool:
    """Present when the tokenizer already uses ``token`` in that role (e.g. ``bos_token == "[DEC]"``)."""
    return getattr(tok, attr) == token


def in_vocab(tok: Any, attr: str, token: str) -> bool:
    """Present when ``token`` is in the vocabulary at all, whatever role it has."""
    return token in tok.get_vocab()


def load_bert_tokenizer(source: Path | None, specials: Sequence[tuple[str, str]], present: Present) -> Any:
    """bert-base-uncased (or ``source``) plus BLIP's ``(attribute, token)`` specials, added in the given order.

    The order matters: the added tokens take the next ids, which must match the checkpoint's embeddings.
    """
    from transformers import AutoTokenizer

    name = str(source) if source is not None else "bert-base-uncased"
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except OSError:
        raise UserError(
            f"cannot load the tokenizer {name!r}; pass --tokenizer DIR (a bert-base-uncased folder) "
            "or put bert-base-uncased in the Hugging Face cache (HF_HOME) and run with HF_HUB_OFFLINE=1"
        ) from None
    for attr, token in specials:
        if not present(tok, attr, token):
            value = [token] if attr == "additional_special_tokens" else token  # that one takes a list
            tok.add_special_tokens({attr: value})
    return tok


def ensure_new_output(output: Path) -> None:
    """Refuse to write into a folder with files: a conversion never mixes with (or replaces) other work."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"output {output} already exists and is not empty; choose a new folder")


def write_atomically(output: Path, models: Mapping[str, Any], tok: Any) -> None:
    """Save into a temporary sibling folder, then rename: a crash never leaves half a model.

    ``models`` maps a subfolder ("" for the top) to a model saved there as safetensors; the
    tokenizer goes to the top. ``output`` must be absent or empty (see ``ensure_new_output``).
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        for subfolder, model in models.items():
            model.save_pretrained(work / subfolder, safe_serialization=True)
        tok.save_pretrained(work)
        if output.exists():
            output.rmdir()  # empty (checked by ensure_new_output)
        os.rename(work, output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
