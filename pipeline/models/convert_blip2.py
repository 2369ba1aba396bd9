"""Convert the LAVIS BLIP-2 stage-1 checkpoint into the referee folder the loader reads.

LAVIS's released ``blip2_pretrained.pth`` holds ``{"model": state_dict}`` with the trainable
parameters only: ``ln_vision.*``, ``query_tokens``, ``Qformer.bert.*`` (BERT with cross-attention
and separate query FFNs), ``Qformer.cls.predictions.*`` (the LM head), ``itm_head.*``,
``vision_proj.*``, ``text_proj.*`` and ``temp``. The frozen ViT is not in it: LAVIS builds it from
``eva_vit_g.pth`` (EVA ViT-g, bare timm-style names, 40 blocks of which LAVIS uses the first 39;
``attn.qkv`` without bias plus separate ``q_bias`` / ``v_bias``). A single file that already holds
``visual_encoder.*`` (a user's merged or fine-tuned checkpoint) is accepted too. Formats are told
apart by their keys, never by file names. The result is:

    OUT/config.json, OUT/model.safetensors   transformers Blip2ForImageTextRetrieval
    OUT/caption_head/                         pipeline.models.caption_head.Blip2CaptionHead
    OUT/tokenizer files                       bert-base-uncased + [DEC] as BOS (LAVIS's tokenizer)

The architecture is read from the tensor shapes; attention heads, which shapes cannot tell,
follow BLIP-2 (88 dimensions per head in EVA ViT-g, 64 in the BERT Q-Former) unless
``base_config`` gives them. ``ln_vision`` keeps its own LayerNorm eps (1e-5, the ViT blocks use
1e-6): the config's ``vision_config.post_layernorm_eps``, which the loader applies. Read with
``torch.load(weights_only=True)``, written as safetensors.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.models import checkpoint_io as ckpt

# LAVIS name -> transformers Blip2ForImageTextRetrieval name (same tensors, no reshaping).
_RULES = [
    *ckpt.VIT_RULES,
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight$", r"vision_model.encoder.layers.\1.self_attn.qkv.weight"),
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
_EVA_EPS = 1e-6  # EVA blocks' LayerNorm
LN_VISION_EPS = 1e-5  # LAVIS's ln_vision is a default nn.LayerNorm; transformers gives it the blocks' eps
_BERT_EPS = 1e-12
# EVA-CLIP ViT-g as released in eva_vit_g.pth has 40 blocks; BLIP-2 drops the last one (the paper uses the
# second-last layer's features), so LAVIS builds 39 and loads the file with strict=False.
EVA_G_WIDTH = 1408
EVA_G_FILE_BLOCKS = 40
LAVIS_VIT_BLOCKS = 39
_VIT_PREFIX = "visual_encoder."
# Keys of the ViT file that LAVIS's ViT has no place for (EVA-CLIP's final norm and heads): ignored, as LAVIS does.
_VISION_IGNORED = re.compile(r"^(norm|fc_norm|head)\.")
_VISION_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _fail(path: Path, why: str) -> UserError:
    return UserError(f"{path}: not a LAVIS BLIP-2 stage-1 checkpoint ({why}); expected blip2_pretrained.pth")


def _vision_fail(path: Path, why: str) -> UserError:
    return UserError(f"{path}: not an EVA ViT checkpoint ({why}); expected eva_vit_g.pth")


def load_original(path: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict, read without running pickle code."""
    return ckpt.load_state_dict(path, partial(_fail, path))


def has_vit(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(_VIT_PREFIX) for k in state)


def is_blip2(state: dict[str, torch.Tensor]) -> bool:
    """The Q-Former and its query tokens: what every BLIP-2 stage-1 checkpoint has, merged or not."""
    return "query_tokens" in state and any(k.startswith("Qformer.bert.") for k in state)


def vision_blocks_used(file_blocks: int, width: int, path: Path) -> int:
    """How many leading blocks of a separate ViT file LAVIS builds: all but the last one.

    The released EVA ViT-g must have its 40 blocks (39 used): a file with another count is not it.
    """
    if width == EVA_G_WIDTH and file_blocks != EVA_G_FILE_BLOCKS:
        raise _vision_fail(path, f"{file_blocks} blocks; EVA ViT-g has {EVA_G_FILE_BLOCKS}, of which LAVIS uses "
                                 f"the first {LAVIS_VIT_BLOCKS}")
    if file_blocks < 2:
        raise _vision_fail(path, f"{file_blocks} blocks; LAVIS drops the last block, so at least 2 are needed")
    return file_blocks - 1


def load_vision(path: Path) -> dict[str, torch.Tensor]:
    """The ViT file's tensors under LAVIS's ``visual_encoder.`` names, its last block and heads dropped."""
    state = ckpt.load_state_dict(path, partial(_vision_fail, path))
    if is_blip2(state) or has_vit(state):
        raise _vision_fail(path, "it holds BLIP-2 (visual_encoder.* / Qformer.*) keys; pass it as --lavis-checkpoint")
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise _vision_fail(path, "no patch_embed.proj.weight / pos_embed keys")
    blocks = ckpt.depth(state, "blocks.")
    gaps = sorted(set(range(blocks)) - set(ckpt.layer_indices(state, "blocks.")))
    if gaps:  # depth is read from the highest block index: a gap would silently shorten the ViT
        raise _vision_fail(path, f"blocks.{gaps[0]}.* missing of {blocks} blocks")
    used = vision_blocks_used(blocks, state["patch_embed.proj.weight"].shape[0], path)
    out = {}
    for key, value in state.items():
        m = _VISION_BLOCK.match(key)
        if _VISION_IGNORED.match(key) or (m and int(m.group(1)) >= used):
            continue
        out[_VIT_PREFIX + key] = value
    return out


def check_merged_vit(state: dict[str, torch.Tensor], path: Path) -> None:
    """A merged file must hold the ViT LAVIS runs: EVA ViT-g's 40 blocks pasted in whole are one too many."""
    blocks = ckpt.depth(state, _VIT_PREFIX + "blocks.")
    if blocks == EVA_G_FILE_BLOCKS:
        raise UserError(
            f"{path}: its ViT has {blocks} blocks, but LAVIS's BLIP-2 uses {LAVIS_VIT_BLOCKS} (the first "
            f"{LAVIS_VIT_BLOCKS} of eva_vit_g.pth); drop visual_encoder.blocks.{blocks - 1}.* or pass the ViT file "
            "as --vision-checkpoint"
        )


def load_checkpoints(checkpoint: Path, vision_checkpoint: Path | None) -> dict[str, torch.Tensor]:
    """One LAVIS state dict (``visual_encoder.*`` included) from the released pair or a merged file."""
    state = load_original(checkpoint)
    if not is_blip2(state):
        if "patch_embed.proj.weight" in state:  # a bare ViT: the two files swapped
            raise _fail(checkpoint, "it holds a bare ViT; pass that file as --vision-checkpoint")
        raise _fail(checkpoint, "no Qformer.bert.* or query_tokens keys")
    if vision_checkpoint is None:
        if not has_vit(state):
            # LAVIS saves trainable parameters only: the released file has no (frozen) ViT.
            raise UserError(f"{checkpoint.name} has no ViT weights: pass --vision-checkpoint eva_vit_g.pth")
        check_merged_vit(state, checkpoint)
        return state
    if has_vit(state):
        raise UserError(
            f"{checkpoint}: it already holds visual_encoder.* weights; drop --vision-checkpoint {vision_checkpoint}"
        )
    return {**state, **load_vision(Path(vision_checkpoint))}


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


def _cross_attention_frequency(state: dict[str, torch.Tensor], path: Path) -> int:
    cross = ckpt.layer_indices(state, "Qformer.bert.encoder.layer.")
    cross = [i for i in cross if f"Qformer.bert.encoder.layer.{i}.crossattention.self.key.weight" in state]
    if not cross or cross[0] != 0:
        raise _fail(path, "the Q-Former's first layer has no cross-attention")
    step = cross[1] - cross[0] if len(cross) > 1 else len(ckpt.layer_indices(state, "Qformer.bert.encoder.layer."))
    if cross != list(range(0, cross[-1] + 1, step)):
        raise _fail(path, f"cross-attention layers {cross} are not evenly spaced")
    return step


def infer_config(state: dict[str, torch.Tensor], path: Path, base: Any = None) -> Any:
    """A Blip2Config whose shapes are the checkpoint's; heads/eps from ``base`` or BLIP-2's."""
    from transformers import Blip2Config

    fail = partial(_fail, path)
    dims = partial(ckpt.shape, state, fail=fail)  # the shape of a required tensor
    bv = base.vision_config if base is not None else None
    bq = base.qformer_config if base is not None else None
    vision = {
        **ckpt.vit_vision_config(state, fail, _EVA_HEAD_DIM, _EVA_EPS, bv),
        "qkv_bias": True,
        "post_layernorm_eps": LN_VISION_EPS,  # applied by pipeline.models.loading (see apply_post_layernorm_eps)
    }
    width = vision["hidden_size"]
    vocab, hidden = dims("Qformer.bert.embeddings.word_embeddings.weight")
    if base is None and (width % _EVA_HEAD_DIM or hidden % _BERT_HEAD_DIM):
        raise UserError(
            f"{path}: widths {width}/{hidden} are not BLIP-2's ViT-g / BERT-base head layout; pass "
            "base_config (a BLIP-2 config folder) to give the attention heads"
        )
    qformer = dict(
        vocab_size=vocab, hidden_size=hidden,
        num_hidden_layers=len(ckpt.layer_indices(state, "Qformer.bert.encoder.layer.")),
        num_attention_heads=bq.num_attention_heads if bq else hidden // _BERT_HEAD_DIM,
        intermediate_size=dims("Qformer.bert.encoder.layer.0.intermediate_query.dense.weight")[0],
        encoder_hidden_size=dims("Qformer.bert.encoder.layer.0.crossattention.self.key.weight")[1],
        cross_attention_frequency=_cross_attention_frequency(state, path),
        max_position_embeddings=dims("Qformer.bert.embeddings.position_embeddings.weight")[0],
        layer_norm_eps=bq.layer_norm_eps if bq else _BERT_EPS,
        use_qformer_text_input=True,  # ITM and captioning run text through the Q-Former
    )
    return Blip2Config(
        vision_config=vision, qformer_config=qformer,
        num_query_tokens=dims("query_tokens")[1],
        image_text_hidden_size=dims("vision_proj.weight")[0],
    )


def _load_tokenizer(source: Path | None) -> Any:
    """bert-base-uncased plus [DEC] as BOS, as LAVIS's Blip2Base.init_tokenizer makes it."""
    return ckpt.load_bert_tokenizer(source, [("bos_token", "[DEC]")], present=ckpt.is_set_as)


def _base_config(base_config: Any) -> Any:
    """A Blip2Config object is used as given; a folder is read."""
    if base_config is None or not isinstance(base_config, (str, Path)):
        return base_config
    from transformers import Blip2Config

    return ckpt.read_base_config(base_config, Blip2Config, "BLIP-2")


def build_models(state: dict[str, torch.Tensor], path: Path, base: Any = None) -> tuple[Any, Any]:
    """(Blip2ForImageTextRetrieval, Blip2CaptionHead) holding the checkpoint's tensors.

    Under ``torch.device("meta")`` this checks a full-size key set without allocating memory."""
    from transformers import Blip2ForImageTextRetrieval

    from pipeline.models.caption_head import Blip2CaptionHead, Blip2CaptionHeadConfig

    config = infer_config(state, path, base)
    referee_state, head_state = split_state(state, path)
    fail = partial(_fail, path)
    referee = Blip2ForImageTextRetrieval(config)
    apply_post_layernorm_eps(referee)
    ckpt.check_keys(referee_state, referee.state_dict(), fail, "referee keys")
    referee.load_state_dict(referee_state, strict=True)
    vocab, hidden = config.qformer_config.vocab_size, config.qformer_config.hidden_size
    head = Blip2CaptionHead(Blip2CaptionHeadConfig(hidden_size=hidden, vocab_size=vocab,
                                                   layer_norm_eps=config.qformer_config.layer_norm_eps))
    ckpt.check_keys(head_state, head.state_dict(), fail, "caption head (Qformer.cls.predictions) keys")
    head.load_state_dict(head_state, strict=True)
    return referee, head


def apply_post_layernorm_eps(referee: Any) -> None:
    """Give ``ln_vision`` (transformers' ``post_layernorm``) its own eps when the config records one."""
    eps = getattr(referee.config.vision_config, "post_layernorm_eps", None)
    if eps is not None:
        referee.vision_model.post_layernorm.eps = float(eps)


def convert_lavis_blip2(
    checkpoint: Path, output: Path, tokenizer: Path | None = None, *, vision_checkpoint: Path | None = None,
    base_config: Any = None,
) -> Path:
    """Write a referee folder (Blip2ForImageTextRetrieval + caption_head/ + tokenizer) to ``output``.

    ``checkpoint``: LAVIS's ``blip2_pretrained.pth`` (then ``vision_checkpoint`` is ``eva_vit_g.pth``)
    or one file that already holds ``visual_encoder.*``. ``base_config``: a Blip2Config or a folder
    holding one, only for the attention-head counts and LayerNorm eps (shapes decide everything else).
    """
    checkpoint, output = Path(checkpoint), Path(output)
    ckpt.ensure_new_output(output)
    state = load_checkpoints(checkpoint, vision_checkpoint)
    tok = _load_tokenizer(tokenizer)
    referee, head = build_models(state, checkpoint, _base_config(base_config))
    if len(tok) != referee.config.qformer_config.vocab_size:
        raise UserError(
            f"tokenizer has {len(tok)} tokens but the checkpoint's vocabulary has "
            f"{referee.config.qformer_config.vocab_size}; use bert-base-uncased (LAVIS adds [DEC] to it)"
        )
    ckpt.write_atomically(output, {"": referee, "caption_head": head}, tok)
    return output
