"""One place that loads the frozen model set.

Every part comes from a Hugging Face id or a local folder through ``from_pretrained`` (which
honours ``HF_HOME`` and ``HF_HUB_OFFLINE``). The ``tiny`` set is built locally and then loaded
by exactly this code. Every weight is frozen (``eval()``, ``requires_grad_(False)``). A model
that cannot be found is a one-line ``ModelLoadError``, not a hub stack trace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.config import MODEL_KEYS, Config, ModelsConfig, stage_generators
from pipeline.errors import ModelLoadError
from pipeline.models.caption_head import Blip2CaptionHead
from pipeline.models.convert_blip2 import apply_post_layernorm_eps
from pipeline.models.quiet import quiet_library_logs
from pipeline.models.sources import expand
from pipeline.models.tiny import small_sources, tiny_sources

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_HOW_TO_PROVIDE = (
    "run `referee-synth models fetch` (then `referee-synth doctor`), or set models.{key} to a local folder, "
    "or put the model in the Hugging Face cache (HF_HOME) and run with HF_HUB_OFFLINE=1"
)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("models.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def model_sources(mcfg: ModelsConfig) -> dict[str, str]:
    """The id or folder of each model, with the tiny or small set substituted when asked."""
    if mcfg.tiny:
        return tiny_sources(mcfg.tiny_cache_dir or None, mcfg.tiny_seed)
    if mcfg.small:
        return small_sources(mcfg.tiny_cache_dir or None, mcfg.tiny_seed)
    return {k: expand(getattr(mcfg, k)) for k in MODEL_KEYS}  # folders may start with ~


def _load(what: str, key: str, loader: Callable[..., Any], source: str, how: str = "", **kwargs: Any) -> Any:
    try:
        return loader(source, **kwargs)
    except OSError as err:  # hub and file-system misses are OSError subclasses
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        where = "local folder" if Path(source).exists() else "model"
        raise ModelLoadError(
            f"cannot load {what} from {where} {source!r} ({reason}); " + (how or _HOW_TO_PROVIDE.format(key=key))
        ) from None


def _freeze(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    module.to(device=device, dtype=dtype)
    module.eval()
    module.requires_grad_(False)
    return module


@dataclass
class GeneratorModels:
    """What the inversion engine needs: SD-1.5 parts and the BLIP-2 referee (None for engine.generator
    sd_sampling, or a cascade whose stages only sample: only SD-1.5 and the scorer are loaded)."""

    vae: Any
    unet: Any
    text_encoder: Any
    clip_tokenizer: Any
    scheduler: Any
    referee: Any  # Blip2ForImageTextRetrieval: vision encoder, Q-Former, ITM head, query tokens
    caption_head: Blip2CaptionHead
    referee_tokenizer: Any  # BERT tokenizer with [DEC] as BOS
    device: torch.device
    dtype: torch.dtype
    sources: dict[str, str] = field(default_factory=dict)


@dataclass
class VqaModels:
    """What the BLIP-VQA scorer needs."""

    model: Any  # BlipForQuestionAnswering
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    source: str = ""


def load_generator_models(cfg: Config) -> GeneratorModels:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, Blip2ForImageTextRetrieval, CLIPTextModel, CLIPTokenizer

    quiet_library_logs()
    m = cfg.models
    src = model_sources(m)
    device, dtype = resolve_device(m.device), DTYPES[m.dtype]
    rev = {} if m.tiny or m.small else {"revision": m.revision}
    sd = src["stable_diffusion"]
    sd_key, ref_key = "stable_diffusion", "referee"
    vae = _load("the SD VAE", sd_key, AutoencoderKL.from_pretrained, sd, subfolder="vae", **rev)
    unet = _load("the SD UNet", sd_key, UNet2DConditionModel.from_pretrained, sd, subfolder="unet", **rev)
    text_encoder = _load(
        "the CLIP text encoder", sd_key, CLIPTextModel.from_pretrained, sd, subfolder="text_encoder", **rev
    )
    clip_tok = _load("the CLIP tokenizer", sd_key, CLIPTokenizer.from_pretrained, sd, subfolder="tokenizer", **rev)
    scheduler = _load("the noise scheduler", sd_key, DDPMScheduler.from_pretrained, sd, subfolder="scheduler", **rev)
    referee = head = ref_tok = None
    if "inversion" in stage_generators(cfg):  # plain sampling never calls the referee: no memory, no start-up
        referee = _load("the BLIP-2 referee", ref_key, Blip2ForImageTextRetrieval.from_pretrained, src["referee"],
                        **rev)
        apply_post_layernorm_eps(referee)  # a converted LAVIS referee: ln_vision's eps differs from the ViT's
        head = _load_caption_head(src["referee"], rev)
        ref_tok = _load("the BLIP-2 tokenizer", ref_key, AutoTokenizer.from_pretrained, src["referee"], **rev)
        if ref_tok.bos_token != "[DEC]":
            # LAVIS adds [DEC] as BOS on top of bert-base-uncased; a plain BERT tokenizer lacks it.
            ref_tok.add_special_tokens({"bos_token": "[DEC]"})
    for module in (vae, unet, text_encoder, referee, head):
        if module is not None:
            _freeze(module, device, dtype)
    return GeneratorModels(
        vae=vae, unet=unet, text_encoder=text_encoder, clip_tokenizer=clip_tok, scheduler=scheduler,
        referee=referee, caption_head=head, referee_tokenizer=ref_tok, device=device, dtype=dtype,
        sources=dict(src),
    )


def _load_caption_head(referee_source: str, rev: dict[str, str]) -> Blip2CaptionHead:
    try:
        return Blip2CaptionHead.from_pretrained(referee_source, subfolder="caption_head", **rev)
    except OSError:
        raise ModelLoadError(
            f"the BLIP-2 caption head (caption_head/) is missing from {referee_source!r}; "
            "run `referee-synth models fetch` (it converts LAVIS's release where models.referee points by "
            "default), or make a referee folder with `python jobs/convert_checkpoints.py blip2 --lavis-checkpoint "
            "blip2_pretrained.pth --vision-checkpoint eva_vit_g.pth --output DIR` and set models.referee to DIR"
        ) from None


def load_vqa_models(cfg: Config) -> VqaModels:
    from transformers import AutoTokenizer, BlipForQuestionAnswering

    quiet_library_logs()
    m = cfg.models
    src = model_sources(m)["vqa"]
    # float32 always: bf16 moves answers in the 4th decimal, which the protocol rounds to.
    device, dtype = resolve_device(m.device), torch.float32
    rev = {} if m.tiny or m.small else {"revision": m.revision}
    model = _load("the BLIP-VQA model", "vqa", BlipForQuestionAnswering.from_pretrained, src, **rev)
    tokenizer = _load("the BLIP-VQA tokenizer", "vqa", AutoTokenizer.from_pretrained, src, **rev)
    _freeze(model, device, dtype)
    return VqaModels(model=model, tokenizer=tokenizer, device=device, dtype=dtype, source=src)


def frozen_modules(gen: GeneratorModels | None = None, vqa: VqaModels | None = None) -> list[torch.nn.Module]:
    """Every network in the given sets (for checks that all weights are frozen)."""
    mods: list[torch.nn.Module] = []
    if gen is not None:
        mods += [gen.vae, gen.unet, gen.text_encoder, gen.referee, gen.caption_head]
    if vqa is not None:
        mods.append(vqa.model)
    return mods


# ---- the referee zoo's and the scorers' extra models (CLIP, open-vocabulary detector) ---------------

ZOO_TINY_KEYS = ("clip", "detector")


def zoo_source(mcfg: ModelsConfig, model_id: str, tiny_key: str) -> str:
    """A zoo model's id or folder; with the tiny or small set, that set's stand-in of kind ``tiny_key``."""
    if tiny_key not in ZOO_TINY_KEYS:
        raise ValueError(f"tiny_key must be one of {ZOO_TINY_KEYS}, not {tiny_key!r}")
    if mcfg.tiny or mcfg.small:
        return model_sources(mcfg)[tiny_key]
    return expand(model_id)


@dataclass
class ZooModel:
    """A frozen extra model and its tokenizer (CLIPModel or Owlv2ForObjectDetection)."""

    model: Any
    tokenizer: Any
    device: torch.device
    source: str


def load_clip(mcfg: ModelsConfig, model_id: str, dtype: torch.dtype = torch.float32) -> ZooModel:
    """transformers' CLIPModel (e.g. openai/clip-vit-large-patch14), frozen, with its tokenizer."""
    from transformers import AutoTokenizer, CLIPModel

    return _load_zoo(mcfg, model_id, "clip", "the CLIP model", CLIPModel, AutoTokenizer, dtype)


def load_detector(mcfg: ModelsConfig, model_id: str, dtype: torch.dtype = torch.float32) -> ZooModel:
    """transformers' OWLv2 detector (e.g. google/owlv2-base-patch16-ensemble), frozen, with its tokenizer."""
    from transformers import AutoTokenizer, Owlv2ForObjectDetection

    return _load_zoo(mcfg, model_id, "detector", "the OWLv2 detector", Owlv2ForObjectDetection, AutoTokenizer, dtype)


def _load_zoo(mcfg: ModelsConfig, model_id: str, tiny_key: str, what: str, model_cls: Any, tok_cls: Any,
              dtype: torch.dtype) -> ZooModel:
    quiet_library_logs()
    src = zoo_source(mcfg, model_id, tiny_key)
    rev = {} if mcfg.tiny or mcfg.small else {"revision": mcfg.revision}
    how = ("set that model id to a local folder, or put the model in the Hugging Face cache (HF_HOME) "
           "and run with HF_HUB_OFFLINE=1")
    model = _load(what, tiny_key, model_cls.from_pretrained, src, how=how, **rev)
    tokenizer = _load(f"{what}'s tokenizer", tiny_key, tok_cls.from_pretrained, src, how=how, **rev)
    device = resolve_device(mcfg.device)
    _freeze(model, device, dtype)
    return ZooModel(model=model, tokenizer=tokenizer, device=device, source=src)
