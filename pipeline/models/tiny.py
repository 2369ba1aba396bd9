"""The ``tiny`` and ``small`` model sets: the real architectures from small configs, random weights.

Built once, from a fixed seed, into a cache folder, then loaded by ``pipeline.models.loading`` through
the same ``from_pretrained`` code as real checkpoints. Images made with them are noise and their
scores are meaningless; the plumbing is real. Concurrent builders are safe: each builds in a
private temporary folder and renames it into place; the loser of the race discards its copy.

``tiny`` is as small as the code allows (tests, CI, the CPU demo: overhead-dominated). ``small``
(``models.small: true``) keeps the real set's proportions at widths where compute dominates on a
CPU (the ViT the largest part, then the VAE decoder, then the UNet): the CPU benchmarks run on it.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

# torch and the model libraries are imported where models are built: the job's driver imports
# this module for the layout names only and stays free of them.
from pipeline.models.quiet import quiet_library_logs

TINY_LAYOUT_VERSION = "tiny-v3"  # v3: + clip/ and detector/ (the referee zoo and scorers)

# Whole words kept in the tiny BERT vocabulary; anything else falls back to letter pieces.
_BERT_WORDS = (
    "a an the of and on in with to yes no photo exactly contains red blue green yellow black white "
    "brown pink purple orange gray round square cube sphere metallic wooden plastic fluffy leather "
    "glass car dog cat bird cup book chair table apple banana bowl left right top side near next"
).split()
_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# BLIP puts these two after the BERT vocabulary: [DEC] is the decoder's BOS, [ENC] the question's.
_BLIP_SPECIALS = ["[DEC]", "[ENC]"]

_CLIP_MERGES = ["t h", "th e</w>", "a n", "an d</w>", "r e", "e d</w>", "o n</w>", "i n"]


def default_cache_dir() -> Path:
    env = os.environ.get("REFEREE_SYNTH_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "referee-synth"


def tiny_root(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    return base / f"{TINY_LAYOUT_VERSION}-seed{seed}"


def _bert_vocab() -> list[str]:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    punct = list(".,!?'\"()*#:;~-_/&")
    pieces = [f"##{c}" for c in letters + digits]
    return _BERT_SPECIALS + letters + digits + punct + pieces + _BERT_WORDS


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _write_clip_tokenizer_files(folder: Path) -> None:
    base = list(_bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base]
    tokens += ["".join(m.split()) for m in _CLIP_MERGES]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_CLIP_MERGES) + "\n")


def build_tokenizers(work: Path):
    """The tiny BERT (with BLIP's [DEC] and [ENC]) and CLIP tokenizers, their files under ``work/_raw``."""
    from transformers import BertTokenizer, CLIPTokenizer

    raw = work / "_raw"
    raw.mkdir()
    (raw / "vocab.txt").write_text("\n".join(_bert_vocab()) + "\n")
    bert = BertTokenizer(vocab=str(raw / "vocab.txt"))
    bert.add_special_tokens({"bos_token": "[DEC]"})
    bert.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    _write_clip_tokenizer_files(raw / "clip")
    clip = CLIPTokenizer(vocab=str(raw / "clip" / "vocab.json"), merges=str(raw / "clip" / "merges.txt"))
    clip.model_max_length = 77
    return bert, clip


def _build_sd(folder: Path, clip_tokenizer) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    vae.save_pretrained(folder / "vae")
    text_cfg = CLIPTextConfig(
        vocab_size=len(clip_tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=clip_tokenizer.bos_token_id,
        eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    )
    CLIPTextModel(text_cfg).save_pretrained(folder / "text_encoder")
    clip_tokenizer.save_pretrained(folder / "tokenizer")
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    unet.save_pretrained(folder / "unet")
    # SD 1.5's noise schedule, so timesteps and alphas behave as in the real model.
    DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    ).save_pretrained(folder / "scheduler")


def _referee_config(bert, v2: bool):
    from transformers import Blip2Config

    # tiny-v2: the Q-Former gets its text layers (ITM and captioning run text through it), and the
    # vision tower a normal init (transformers' default of 1e-10 makes it blind to the image).
    cfg = Blip2Config(
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, **({"initializer_range": 0.02} if v2 else {}),
        ),
        qformer_config=dict(
            vocab_size=len(bert), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, encoder_hidden_size=32, cross_attention_frequency=1,
            max_position_embeddings=64, use_qformer_text_input=v2,
        ),
        num_query_tokens=4,
        image_text_hidden_size=16,
    )
    return cfg


def _build_referee(folder: Path, bert) -> None:
    import torch
    from transformers import Blip2ForImageTextRetrieval

    from pipeline.models.caption_head import Blip2CaptionHead, Blip2CaptionHeadConfig

    # Draw the RNG exactly as tiny-v1 did, so every other tiny model keeps its tiny-v1 weights;
    # the tiny-v2 referee itself comes from a fork of the RNG.
    Blip2ForImageTextRetrieval(_referee_config(bert, v2=False))
    cfg = _referee_config(bert, v2=True)
    with torch.random.fork_rng(devices=[]):
        referee = Blip2ForImageTextRetrieval(cfg)
        referee.query_tokens.data.normal_(std=cfg.initializer_range)  # as LAVIS; zeros make all queries equal
    referee.save_pretrained(folder)
    bert.save_pretrained(folder)
    head = Blip2CaptionHead(Blip2CaptionHeadConfig(hidden_size=32, vocab_size=len(bert)))
    head.save_pretrained(folder / "caption_head")


def _build_vqa(folder: Path, bert) -> None:
    from transformers import BlipConfig, BlipForQuestionAnswering

    cfg = BlipConfig(
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            image_size=480, patch_size=48,
        ),
        text_config=dict(
            vocab_size=len(bert), hidden_size=32, encoder_hidden_size=32, intermediate_size=37,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
            bos_token_id=bert.convert_tokens_to_ids("[DEC]"), pad_token_id=bert.pad_token_id,
            sep_token_id=bert.sep_token_id, eos_token_id=bert.sep_token_id,
        ),
    )
    BlipForQuestionAnswering(cfg).save_pretrained(folder)
    bert.save_pretrained(folder)


def _build_clip(folder: Path, clip_tokenizer) -> None:
    """A CLIPModel (both towers) at 32 px: the CLIP referee and the CLIPScore scorer load it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(clip_tokenizer), max_position_embeddings=77, bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id, pad_token_id=clip_tokenizer.pad_token_id, **tower,
        ),
        vision_config=dict(image_size=32, patch_size=8, **tower),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(folder)
    clip_tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


def _build_detector(folder: Path, clip_tokenizer) -> None:
    """An OWLv2 open-vocabulary detector at 64 px (4x4 patches -> 16 boxes), OWL's 16-token text."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    cfg = Owlv2Config(
        text_config=dict(
            vocab_size=len(clip_tokenizer), max_position_embeddings=16, bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id, pad_token_id=clip_tokenizer.pad_token_id, **tower,
        ),
        vision_config=dict(image_size=64, patch_size=16, **tower),
        projection_dim=32,  # OWL's class head compares text projections with vision-width embeddings
    )
    Owlv2ForObjectDetection(cfg).save_pretrained(folder)
    tokenizer = copy.deepcopy(clip_tokenizer)
    tokenizer.model_max_length = 16
    tokenizer.save_pretrained(folder)


def _build_zoo_models(work: Path, clip_tokenizer) -> None:
    # Built last, so every model before keeps the weights the earlier layouts gave it.
    _build_clip(work / "clip", clip_tokenizer)
    _build_detector(work / "detector", clip_tokenizer)


def _build_once(root: Path, layout: str, seed: int, build: Callable[[Path], None]) -> Path:
    """Run ``build(work)`` in a private folder and rename it to ``root``; a no-op when ``root`` is done."""
    if (root / "DONE").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    import torch

    work = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    quiet_library_logs()
    try:
        torch.manual_seed(seed)
        build(work)
        shutil.rmtree(work / "_raw", ignore_errors=True)
        (work / "DONE").write_text(json.dumps({"layout": layout, "seed": seed}))
        try:
            os.rename(work, root)
        except OSError:
            # Another process finished first; its copy is equivalent (same seed, same code).
            if not (root / "DONE").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return root


def _build_tiny(work: Path) -> None:
    bert, clip = build_tokenizers(work)
    _build_sd(work / "sd", clip)
    _build_referee(work / "referee", bert)
    _build_vqa(work / "vqa", bert)
    _build_zoo_models(work, clip)


def build_tiny_models(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Build the tiny set if absent; return its folder. Safe under concurrent callers."""
    return _build_once(tiny_root(cache_dir, seed), TINY_LAYOUT_VERSION, seed, _build_tiny)


def tiny_sources(cache_dir: str | Path | None = None, seed: int = 0) -> dict[str, str]:
    """Model folders of the tiny set, keyed like ``ModelsConfig``'s id fields."""
    return _sources(build_tiny_models(cache_dir, seed))


def _sources(root: Path) -> dict[str, str]:
    """Folders keyed like ``ModelsConfig``'s id fields, plus ``clip`` and ``detector`` (the zoo's tiny stand-ins)."""
    names = {"stable_diffusion": "sd", "referee": "referee", "vqa": "vqa", "clip": "clip", "detector": "detector"}
    return {key: str(root / name) for key, name in names.items()}


# ---- the small set ------------------------------------------------------------------------------

SMALL_LAYOUT_VERSION = "small-v2"  # v2: + the tiny clip/ and detector/

# Widths of the small set. Proportions follow the real set (SD-1.5, BLIP-2 ViT-g + Q-Former,
# BLIP ViT-B VQA): per image and iteration the referee's ViT (fwd+bwd over the views) costs most,
# then the Q-Former and the VAE decoder (fwd+bwd), then the UNet's two forwards. Every matrix is
# wide enough that a CPU spends its time in the kernels, not in Python. configs/small.yaml runs it
# at 64 px images (latent 8) and 64 px referee views (8x8 patches + CLS, as ViT-g's 16x16 + CLS).
SMALL_SIZES = {
    "vit": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6,
                image_size=64, patch_size=8),
    "qformer": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, intermediate_size=768,
                    cross_attention_frequency=2),
    "num_query_tokens": 8,
    "vae_channels": (32, 64, 128, 128),
    "unet_channels": (64, 128, 128),
    "clip": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4),
    "vqa_vit": dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                    image_size=480, patch_size=40),
    "vqa_text": dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4),
}


def small_root(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    return base / f"{SMALL_LAYOUT_VERSION}-seed{seed}"


def _build_small_sd(folder: Path, clip_tokenizer) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    AutoencoderKL(
        block_out_channels=SMALL_SIZES["vae_channels"],
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    ).save_pretrained(folder / "vae")
    clip = SMALL_SIZES["clip"]
    text_cfg = CLIPTextConfig(
        vocab_size=len(clip_tokenizer), max_position_embeddings=77, bos_token_id=clip_tokenizer.bos_token_id,
        eos_token_id=clip_tokenizer.eos_token_id, pad_token_id=clip_tokenizer.pad_token_id, **clip,
    )
    CLIPTextModel(text_cfg).save_pretrained(folder / "text_encoder")
    clip_tokenizer.save_pretrained(folder / "tokenizer")
    UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=SMALL_SIZES["unet_channels"],
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=clip["hidden_size"],
        attention_head_dim=8,
        norm_num_groups=16,
    ).save_pretrained(folder / "unet")
    DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    ).save_pretrained(folder / "scheduler")


def _build_small_referee(folder: Path, bert) -> None:
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    from pipeline.models.caption_head import Blip2CaptionHead, Blip2CaptionHeadConfig

    vit, qf = SMALL_SIZES["vit"], SMALL_SIZES["qformer"]
    cfg = Blip2Config(
        vision_config=dict(initializer_range=0.02, **vit),
        qformer_config=dict(
            vocab_size=len(bert), encoder_hidden_size=vit["hidden_size"], max_position_embeddings=64,
            use_qformer_text_input=True, **qf,
        ),
        num_query_tokens=SMALL_SIZES["num_query_tokens"],
        image_text_hidden_size=64,
    )
    referee = Blip2ForImageTextRetrieval(cfg)
    referee.query_tokens.data.normal_(std=cfg.initializer_range)
    referee.save_pretrained(folder)
    bert.save_pretrained(folder)
    head = Blip2CaptionHead(Blip2CaptionHeadConfig(hidden_size=qf["hidden_size"], vocab_size=len(bert)))
    head.save_pretrained(folder / "caption_head")


def _build_small_vqa(folder: Path, bert) -> None:
    from transformers import BlipConfig, BlipForQuestionAnswering

    text = SMALL_SIZES["vqa_text"]
    cfg = BlipConfig(
        vision_config=dict(SMALL_SIZES["vqa_vit"]),
        text_config=dict(
            vocab_size=len(bert), encoder_hidden_size=SMALL_SIZES["vqa_vit"]["hidden_size"],
            max_position_embeddings=64, bos_token_id=bert.convert_tokens_to_ids("[DEC]"),
            pad_token_id=bert.pad_token_id, sep_token_id=bert.sep_token_id, eos_token_id=bert.sep_token_id, **text,
        ),
    )
    BlipForQuestionAnswering(cfg).save_pretrained(folder)
    bert.save_pretrained(folder)


def _build_small(work: Path) -> None:
    bert, clip = build_tokenizers(work)
    _build_small_sd(work / "sd", clip)
    _build_small_referee(work / "referee", bert)
    _build_small_vqa(work / "vqa", bert)
    _build_zoo_models(work, clip)


def build_small_models(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Build the small set if absent; return its folder. Safe under concurrent callers."""
    return _build_once(small_root(cache_dir, seed), SMALL_LAYOUT_VERSION, seed, _build_small)


def small_sources(cache_dir: str | Path | None = None, seed: int = 0) -> dict[str, str]:
    """Model folders of the small set, keyed like ``ModelsConfig``'s id fields."""
    return _sources(build_small_models(cache_dir, seed))
