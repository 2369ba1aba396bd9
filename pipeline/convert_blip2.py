"""Convert the LAVIS BLIP-2 stage-1 checkpoint into the referee folder the loader reads.

``blip2_pretrained.pth`` holds ``{"model": state_dict}`` with ``visual_encoder.*`` (EVA ViT-g,
39 blocks, ``attn.qkv`` without bias plus separate ``q_bias`` / ``v_bias``), ``ln_vision.*``,
``query_tokens``, ``Qformer.bert.*`` (BERT with cross-attention and separate query FFNs),
``Qformer.cls.predictions.*`` (the LM head), ``itm_head.*``, ``vision_proj.*``, ``text_proj.*``
and ``temp``. The result is:

    OUT/config.json, OUT/model.safetensors   transformers Blip2ForImageTextRetrieval
    OUT/caption_head/                         pipeline.caption_head.Blip2CaptionHead
    OUT/tokenizer files                       bert-base-uncased + [DEC] as BOS (LAVIS's tokenizer)

The architecture is read from the tensor shapes; attention heads, which shapes cannot tell,
follow BLIP-2 (88 dimensions per head in EVA ViT-g, 64 in the BERT Q-Former) unless
``base_config`` gives them. Read with ``torch.load(weights_only=True)``, written as safetensors.
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

# LAVIS name -> transformers Blip2ForImageTextRetrieval name (same tensors, no reshaping).
_RULES = [
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.(weight|bias)$", r"vision_model.embeddings.patch_embedding.\1"),
    (r"^visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight$", r"vision_model.encoder.layers.\1.self_attn.qkv.weight"),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.", r"vision_model.encoder.layers.\1.mlp.\2."),
    (r"^ln_vision\.(weight|bias)$", r"vision_model.post_layernorm.\1"),
    (r"^query_tokens$", "query_tokens"),
    (r"^Qformer\.bert\.embeddings\.(word|position)_embeddings\.weight$", r"embeddings.\1_embeddings.weight"),
    (r"^Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)$", r"qformer.layernorm.\1"),
    (
        r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.",
        r"qformer.encoder.layer.\1.\2.attention.",
    ),
    (r"^Qformer\.bert\.encoder\.layer\.(\d+)\.", r"qformer.encoder.layer.\1."),
    (r"^vision_proj\.(weight|bias)$", r"vision_projection.\1"),
    (r"^text_proj\.(weight|bias)$", r"text_projection.\1"),
    (r"^itm_head\.(weight|bias)$", r"itm_head.\1"),
]
_HEAD_RULES = [
    (r"^Qformer\.cls\.predictions\.transform\.dense\.(weight|bias)$", r"dense.\1"),
    (r"^Qformer\.cls\.predictions\.transform\.LayerNorm\.(weight|bias)$", r"layer_norm.\1"),
    (r"^Qformer\.cls\.predictions\.decoder\.weight$", "decoder.weight"),
    (r"^Qformer\.cls\.predictions\.bias$", "decoder.bias"),
]
_QV_BIAS = re.compile(r"^visual_encoder\.blocks\.(\d+)\.attn\.(q|v)_bias$")
# Not weights of the referee: the ITC temperature, a recomputed buffer, the decoder's alias of `bias`.
_IGNORED = re.compile(r"^(temp|Qformer\.bert\.embeddings\.position_ids|Qformer\.cls\.predictions\.decoder\.bias)$")

_EVA_HEAD_DIM = 88  # EVA ViT-g: 1408 / 16
_BERT_HEAD_DIM = 64  # BERT-base: 768 / 12
_EVA_EPS = 1e-6  # EVA blocks' LayerNorm (LAVIS's ln_vision uses 1e-5; transformers has one eps for both)
_BERT_EPS = 1e-12


def _fail(path: Path, why: str) -> UserError:
    return UserError(f"{path}: not a LAVIS BLIP-2 stage-1 checkpoint ({why}); expected blip2_pretrained.pth")


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


def _rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return None


def split_state(state: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(referee state dict, caption-head state dict) in transformers / project names."""
    referee: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    qv: dict[tuple[str, str], torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if _IGNORED.match(key):
            continue
        if m := _QV_BIAS.match(key):
            qv[(m.group(1), m.group(2))] = value
        elif (new := _rename(key, _RULES)) is not None:
            referee[new] = value
        elif (new := _rename(key, _HEAD_RULES)) is not None:
            head[new] = value
        else:
            unknown.append(key)
    if unknown:
        raise _fail(path, f"{len(unknown)} unexpected keys, e.g. {sorted(unknown)[0]}")
    for layer in sorted({layer for layer, _ in qv}, key=int):
        q, v = qv.get((layer, "q")), qv.get((layer, "v"))
        if q is None or v is None:
            raise _fail(path, f"block {layer} has only one of attn.q_bias / attn.v_bias")
        # EVA's qkv bias is (q_bias, 0, v_bias): keys carry no bias.
        referee[f"vision_model.encoder.layers.{layer}.self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(v), v])
    if "decoder.weight" not in head and "embeddings.word_embeddings.weight" in referee:
        head["decoder.weight"] = referee["embeddings.word_embeddings.weight"]  # BERT ties them
    return referee, head


def _shape(state: dict[str, torch.Tensor], key: str, path: Path) -> tuple[int, ...]:
    if key not in state:
        raise _fail(path, f"missing {key}")
    return tuple(state[key].shape)


def _layers(state: dict[str, torch.Tensor], prefix: str) -> list[int]:
    return sorted({int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})


def _cross_attention_frequency(state: dict[str, torch.Tensor], path: Path) -> int:
    cross = _layers(state, "Qformer.bert.encoder.layer.")
    cross = [i for i in cross if f"Qformer.bert.encoder.layer.{i}.crossattention.self.key.weight" in state]
    if not cross or cross[0] != 0:
        raise _fail(path, "the Q-Former's first layer has no cross-attention")
    step = cross[1] - cross[0] if len(cross) > 1 else len(_layers(state, "Qformer.bert.encoder.layer."))
    if cross != list(range(0, cross[-1] + 1, step)):
        raise _fail(path, f"cross-attention layers {cross} are not evenly spaced")
    return step


def infer_config(state: dict[str, torch.Tensor], path: Path, base: Any = None) -> Any:
    """A Blip2Config whose shapes are the checkpoint's; heads/eps from ``base`` or BLIP-2's."""
    from transformers import Blip2Config

    width, _, patch, _ = _shape(state, "visual_encoder.patch_embed.proj.weight", path)
    positions = _shape(state, "visual_encoder.pos_embed", path)[1]
    grid = int(round((positions - 1) ** 0.5))
    if grid * grid != positions - 1:
        raise _fail(path, f"pos_embed has {positions} positions, not a square grid plus [CLS]")
    vocab, hidden = _shape(state, "Qformer.bert.embeddings.word_embeddings.weight", path)
    bv = base.vision_config if base is not None else None
    bq = base.qformer_config if base is not None else None
    if base is None and (width % _EVA_HEAD_DIM or hidden % _BERT_HEAD_DIM):
        raise UserError(
            f"{path}: widths {width}/{hidden} are not BLIP-2's ViT-g / BERT-base head layout; pass "
            "base_config (a BLIP-2 config folder) to give the attention heads"
        )
    vision = dict(
        hidden_size=width, image_size=grid * patch, patch_size=patch,
        intermediate_size=_shape(state, "visual_encoder.blocks.0.mlp.fc1.weight", path)[0],
        num_hidden_layers=len(_layers(state, "visual_encoder.blocks.")),
        num_attention_heads=bv.num_attention_heads if bv else width // _EVA_HEAD_DIM,
        layer_norm_eps=bv.layer_norm_eps if bv else _EVA_EPS, qkv_bias=True,
    )
    qformer = dict(
        vocab_size=vocab, hidden_size=hidden,
        num_hidden_layers=len(_layers(state, "Qformer.bert.encoder.layer.")),
        num_attention_heads=bq.num_attention_heads if bq else hidden // _BERT_HEAD_DIM,
        intermediate_size=_shape(state, "Qformer.bert.encoder.layer.0.intermediate_query.dense.weight", path)[0],
        encoder_hidden_size=_shape(state, "Qformer.bert.encoder.layer.0.crossattention.self.key.weight", path)[1],
        cross_attention_frequency=_cross_attention_frequency(state, path),
        max_position_embeddings=_shape(state, "Qformer.bert.embeddings.position_embeddings.weight", path)[0],
        layer_norm_eps=bq.layer_norm_eps if bq else _BERT_EPS,
        use_qformer_text_input=True,  # ITM and captioning run text through the Q-Former
    )
    return Blip2Config(
        vision_config=vision, qformer_config=qformer,
        num_query_tokens=_shape(state, "query_tokens", path)[1],
        image_text_hidden_size=_shape(state, "vision_proj.weight", path)[0],
    )


def _load_tokenizer(source: Path | None) -> Any:
    """bert-base-uncased plus [DEC] as BOS, as LAVIS's Blip2Base.init_tokenizer makes it."""
    from transformers import AutoTokenizer

    name = str(source) if source is not None else "bert-base-uncased"
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except OSError:
        raise UserError(
            f"cannot load the tokenizer {name!r}; pass --tokenizer DIR (a bert-base-uncased folder) "
            "or put bert-base-uncased in the Hugging Face cache (HF_HOME) and run with HF_HUB_OFFLINE=1"
        ) from None
    if tok.bos_token != "[DEC]":
        tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def _check_keys(mapped: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path, what: str) -> None:
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} {what} keys missing, e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
        raise _fail(path, "; ".join(parts))
    for key, value in mapped.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise _fail(path, f"{key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")


def _base_config(base_config: Any) -> Any:
    if base_config is None or not isinstance(base_config, (str, Path)):
        return base_config
    from transformers import Blip2Config

    try:
        return Blip2Config.from_pretrained(str(base_config))
    except OSError:
        raise UserError(f"cannot read a BLIP-2 config from {base_config}") from None


def _build_models(state: dict[str, torch.Tensor], path: Path, base: Any) -> tuple[Any, Any]:
    from transformers import Blip2ForImageTextRetrieval

    from pipeline.caption_head import Blip2CaptionHead, Blip2CaptionHeadConfig

    config = infer_config(state, path, base)
    referee_state, head_state = split_state(state, path)
    referee = Blip2ForImageTextRetrieval(config)
    _check_keys(referee_state, referee.state_dict(), path, "referee")
    referee.load_state_dict(referee_state, strict=True)
    vocab, hidden = config.qformer_config.vocab_size, config.qformer_config.hidden_size
    head = Blip2CaptionHead(Blip2CaptionHeadConfig(hidden_size=hidden, vocab_size=vocab,
                                                   layer_norm_eps=config.qformer_config.layer_norm_eps))
    _check_keys(head_state, head.state_dict(), path, "caption head (Qformer.cls.predictions)")
    head.load_state_dict(head_state, strict=True)
    return referee, head


def convert_lavis_blip2(
    checkpoint: Path, output: Path, tokenizer: Path | None = None, *, base_config: Any = None
) -> Path:
    """Write a referee folder (Blip2ForImageTextRetrieval + caption_head/ + tokenizer) to ``output``.

    ``base_config``: a Blip2Config or a folder holding one, only for the attention-head counts and
    LayerNorm eps (the checkpoint's shapes decide everything else).
    """
    checkpoint, output = Path(checkpoint), Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"output {output} already exists and is not empty; choose a new folder")
    state = load_original(checkpoint)
    if not any(k.startswith("Qformer.bert.") for k in state) or "query_tokens" not in state:
        raise _fail(checkpoint, "no Qformer.bert.* or query_tokens keys")
    tok = _load_tokenizer(tokenizer)
    referee, head = _build_models(state, checkpoint, _base_config(base_config))
    if len(tok) != referee.config.qformer_config.vocab_size:
        raise UserError(
            f"tokenizer has {len(tok)} tokens but the checkpoint's vocabulary has "
            f"{referee.config.qformer_config.vocab_size}; use bert-base-uncased (LAVIS adds [DEC] to it)"
        )
    _write_atomically(referee, head, tok, output)
    return output


def _write_atomically(referee: Any, head: Any, tok: Any, output: Path) -> None:
    """Save into a temporary sibling folder, then rename: a crash never leaves half a model."""
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        referee.save_pretrained(work, safe_serialization=True)
        head.save_pretrained(work / "caption_head", safe_serialization=True)
        tok.save_pretrained(work)
        if output.exists():
            output.rmdir()  # empty (checked above)
        os.rename(work, output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
