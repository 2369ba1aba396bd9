"""Runs in the parity REFERENCE environment (tests/parity/reference_env.py), never in the project's.

Instantiates the original code, as installed from the registries: LAVIS's ``Blip2Qformer`` (with its
registered ITM subclass ``Blip2ITM`` for the ITM logits) and BLIP's ``BLIP_VQA``, at reduced sizes
(``--full``: the released sizes) and with random weights. Writes checkpoints in the released formats
and the original code's outputs:

    OUT/blip2_pretrained.pth                {"model": trainable parameters + buffers, "config", "epoch"},
                                            no visual_encoder.* (LAVIS's saver drops frozen parameters)
    OUT/eva_vit_g.pth                       bare-named ViT state dict, fp16, one block more than LAVIS uses
    OUT/model_base_vqa_capfilt_large.pth    {"model": state_dict} (BLIP's saver)
    OUT/blip2_reference.pt, OUT/vqa_reference.pt   inputs and outputs, loadable with weights_only=True

Nothing is downloaded: ``bert-base-uncased`` (config, weights, tokenizer) and ``eva_vit_g.pth`` are
pointed at local files and reduced configs. ``vqa_prob`` is T2I-CompBench's rule (p(yes) /
(p(yes) + p(no)) at the first decoder step), written here, as its scorer adds it to ``BLIP_VQA``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import types
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass(frozen=True)
class Sizes:
    eva: dict  # EVA ViT (LAVIS's VisionTransformer kwargs); the file gets one block more
    blip2_image: int
    qformer: dict  # BertConfig fields of the Q-Former
    blip2: dict  # Blip2Qformer kwargs
    vqa_vit: dict  # BLIP VisionTransformer kwargs (create_vit's "base")
    vqa_image: int
    med: dict  # med_config.json fields


# Head widths stay the originals' (88 in EVA ViT-g, 64 in BERT and BLIP's ViT-B), so the project's
# converters infer the attention heads exactly as for the released checkpoints.
REDUCED = Sizes(
    eva=dict(embed_dim=176, depth=2, num_heads=2, mlp_ratio=4.3637),
    blip2_image=56,  # 4x4 patches of 14 px
    qformer=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=2, intermediate_size=256),
    blip2=dict(num_query_token=8, cross_attention_freq=2, embed_dim=32, max_txt_len=32),
    vqa_vit=dict(embed_dim=128, depth=2, num_heads=2),
    vqa_image=64,  # 4x4 patches of 16 px
    # encoder_width: the decoder cross-attends to the text encoder (BLIP_VQA resets the encoder's own)
    med=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, encoder_width=128),
)
# The released models' sizes (blip2_pretrain.yaml, T2I-CompBench's BLIP_VQA): FULL=1, about 8 GB of memory.
FULL = Sizes(
    eva=dict(embed_dim=1408, depth=39, num_heads=16, mlp_ratio=4.3637),
    blip2_image=224,
    qformer=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    blip2=dict(num_query_token=32, cross_attention_freq=2, embed_dim=256, max_txt_len=32),
    vqa_vit=dict(embed_dim=768, depth=12, num_heads=12),
    vqa_image=480,
    med={},
)
VQA_MAX_QUESTION_TOKENS = 35  # BLIP_VQA.forward's tokenizer truncation
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Already cleaned as the datasets' text processors leave them (lower case, no listed punctuation).
BLIP2_TEXTS = [
    "a red apple and a green pear on a wooden table",
    "a cat",
    # over 32 tokens: truncated by max_txt_len
    "a small brown dog with a red collar sits next to a tall blue vase full of yellow flowers on a shiny "
    "black piano in a bright room with white walls and a large open window facing the sea",
]
# Per image, the noun-chunk questions; T2I-CompBench scores slot i of every image in one padded batch.
VQA_QUESTIONS = [
    ["a red apple?", "a wooden table?"],
    ["a green bench?"],
    [
        # over 35 tokens: truncated by BLIP_VQA
        "a very small brown dog with a bright red collar and a long fluffy tail that sits next to a tall "
        "blue vase full of yellow flowers on a shiny black grand piano in a bright room?",
        "the blue bowl?",
        "a cat?",
    ],
]
SEED = 1234
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 4.33 on torch 2.13


def register_packages(root: str, subpackages: list[str]) -> None:
    """Make ``root.sub...`` importable without running their ``__init__`` (lavis's imports everything)."""
    spec = importlib.util.find_spec(root)
    base = Path(spec.submodule_search_locations[0])
    for dotted in ["", *subpackages]:
        name = f"{root}.{dotted}" if dotted else root
        module = types.ModuleType(name)
        module.__path__ = [str(base.joinpath(*dotted.split(".")) if dotted else base)]
        sys.modules[name] = module


def perturb(module: torch.nn.Module, generator: torch.Generator, only_trainable: bool = False) -> None:
    """Add N(0, 0.02^2) to every parameter: non-trivial LayerNorms, biases, q/v biases; distinct query FFNs."""
    with torch.no_grad():
        for param in module.parameters():
            if param.requires_grad or not only_trainable:
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)


# ---- BLIP-2 (LAVIS) -------------------------------------------------------------------------------


def patch_lavis(vocab_dir: Path, eva_file: Path, sizes: Sizes) -> tuple[Any, Any]:
    """Import LAVIS's BLIP-2 modules with local bert-base-uncased stand-ins and a reduced EVA ViT.

    Returns (Blip2ITM, EVA's VisionTransformer class as LAVIS defines it)."""
    register_packages("lavis", ["models", "models.blip2_models", "models.blip_models"])
    from lavis.models import base_model

    sys.modules["lavis.models"].BaseModel = base_model.BaseModel  # what registry.register_model checks against
    from lavis.models import eva_vit
    from lavis.models.blip2_models import Qformer, blip2

    full_size = eva_vit.VisionTransformer
    # create_eva_vit_g passes ViT-g's sizes explicitly: override them, keep everything else it passes.
    eva_vit.VisionTransformer = lambda **kwargs: full_size(**{**kwargs, **sizes.eva})
    eva_vit.download_cached_file = lambda url, check_hash=False, progress=False: str(eva_file)

    class LocalBertConfig:
        @staticmethod
        def from_pretrained(name: str) -> Any:
            assert name == "bert-base-uncased", name
            return Qformer.BertConfig(vocab_size=30522, **sizes.qformer)

    class LocalBertLMHeadModel:
        @staticmethod
        def from_pretrained(name: str, config: Any) -> Any:
            return Qformer.BertLMHeadModel(config)  # random init instead of the hub's weights

    class LocalBertTokenizer:
        @staticmethod
        def from_pretrained(name: str) -> Any:
            from transformers import BertTokenizer

            return BertTokenizer.from_pretrained(str(vocab_dir))

    blip2.BertConfig, blip2.BertLMHeadModel, blip2.BertTokenizer = (
        LocalBertConfig, LocalBertLMHeadModel, LocalBertTokenizer
    )
    from lavis.models.blip2_models.blip2_image_text_matching import Blip2ITM

    return Blip2ITM, full_size


def write_eva_file(path: Path, vit_class: Any, sizes: Sizes, generator: torch.Generator) -> None:
    """EVA ViT in eva_vit_g.pth's layout: bare names, fp16, one block more than LAVIS builds."""
    vit = vit_class(
        img_size=sizes.blip2_image, patch_size=14, use_mean_pooling=False, qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), **{**sizes.eva, "depth": sizes.eva["depth"] + 1},
    )
    perturb(vit, generator)
    torch.save({k: v.half() for k, v in vit.state_dict().items()}, path)


def lavis_saved_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What LAVIS's runner saves: the state dict less every parameter that does not require grad."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k not in frozen}


def blip2_reference(out: Path, vocab_dir: Path, sizes: Sizes, generator: torch.Generator) -> None:
    eva_file = out / "eva_vit_g.pth"
    Blip2ITM, vit_class = patch_lavis(vocab_dir, eva_file, sizes)
    write_eva_file(eva_file, vit_class, sizes, generator)
    from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

    model = Blip2ITM(img_size=sizes.blip2_image, vit_precision="fp32", freeze_vit=True, **sizes.blip2)
    assert isinstance(model, Blip2Qformer)
    perturb(model, generator, only_trainable=True)
    model.eval()
    saved = lavis_saved_state(model)
    assert not any(k.startswith("visual_encoder.") for k in saved)
    torch.save({"model": saved, "config": {"model": {"arch": "blip2", "model_type": "pretrain"}}, "epoch": 9},
               out / "blip2_pretrained.pth")

    n = len(BLIP2_TEXTS)
    pixels = torch.randn(n, 3, sizes.blip2_image, sizes.blip2_image, generator=generator)
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(module: Any, inputs: Any, output: torch.Tensor) -> None:  # None: the output stays as it is
            captured[name] = output

        return hook

    hooks = [model.ln_vision.register_forward_hook(keep("image_embeds")),
             model.Qformer.cls.register_forward_hook(keep("caption_logits"))]
    with torch.no_grad():
        # Blip2ITM.forward is the ITM head only; the stage-1 forward (image embeddings, captioning) is its base's.
        output = Blip2Qformer.forward(model, {"image": pixels, "text_input": BLIP2_TEXTS})
        for hook in hooks:
            hook.remove()
        tokens = model.tokenizer(BLIP2_TEXTS, padding="max_length", truncation=True,
                                 max_length=model.max_txt_len, return_tensors="pt")
        itm = torch.stack([
            torch.stack([
                model({"image": pixels[i : i + 1], "text_input": [text]}, match_head="itm")[0]
                for text in BLIP2_TEXTS
            ])
            for i in range(n)
        ])  # [image, text, 2]
    itm_loss = F.cross_entropy(itm.flatten(0, 1), torch.ones(n * n, dtype=torch.long), reduction="none")
    torch.save({
        "texts": BLIP2_TEXTS, "pixels": pixels, "token_ids": tokens.input_ids, "token_mask": tokens.attention_mask,
        "image_embeds": captured["image_embeds"], "itm_logits": itm, "itm_loss": itm_loss.view(n, n),
        "caption_logits": captured["caption_logits"], "caption_loss": output.loss_lm,
        "used_vit_blocks": len(model.visual_encoder.blocks),
    }, out / "blip2_reference.pt")


# ---- BLIP VQA (BLIP, T2I-CompBench's rule) ---------------------------------------------------------


def patch_blip(vocab_dir: Path, sizes: Sizes) -> Any:
    from blip.models import blip, blip_vqa
    from transformers import BertTokenizer

    def reduced_vit(vit: str, image_size: int, *args: Any, **kwargs: Any) -> tuple[Any, int]:
        assert vit == "base", vit
        encoder = blip.VisionTransformer(img_size=image_size, patch_size=16, **sizes.vqa_vit)
        return encoder, sizes.vqa_vit["embed_dim"]

    class LocalBertTokenizer:
        @staticmethod
        def from_pretrained(name: str) -> Any:
            return BertTokenizer.from_pretrained(str(vocab_dir))

    blip_vqa.create_vit = reduced_vit
    blip.BertTokenizer = LocalBertTokenizer
    return blip_vqa.BLIP_VQA


def vqa_prob(model: Any, question_states: torch.Tensor, question_atts: torch.Tensor) -> torch.Tensor:
    """T2I-CompBench's rule: p(yes) / (p(yes) + p(no)) from the decoder's first step after [DEC]."""
    start = torch.full((question_states.shape[0], 1), model.tokenizer.bos_token_id, dtype=torch.long)
    out = model.text_decoder(start, encoder_hidden_states=question_states, encoder_attention_mask=question_atts,
                             return_dict=True, reduction="none")
    prob = torch.softmax(out.logits[:, 0, :], dim=1)
    yes, no = model.tokenizer.convert_tokens_to_ids(["yes", "no"])
    return prob[:, yes] / (prob[:, yes] + prob[:, no])


def answer_slot(model: Any, pixels: torch.Tensor, questions: list[str]) -> torch.Tensor:
    """One padded batch of (image, question) pairs, as BLIP_VQA.forward encodes it."""
    image_embeds = model.visual_encoder(pixels)
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long)
    q = model.tokenizer(questions, padding="longest", truncation=True, max_length=VQA_MAX_QUESTION_TOKENS,
                        return_tensors="pt")
    q.input_ids[:, 0] = model.tokenizer.enc_token_id
    states = model.text_encoder(q.input_ids, attention_mask=q.attention_mask, encoder_hidden_states=image_embeds,
                                encoder_attention_mask=image_atts, return_dict=True).last_hidden_state
    return vqa_prob(model, states, q.attention_mask)


def vqa_reference(out: Path, vocab_dir: Path, sizes: Sizes, generator: torch.Generator) -> None:
    BLIP_VQA = patch_blip(vocab_dir, sizes)
    with tempfile.TemporaryDirectory() as tmp:
        med = json.loads((Path(importlib.util.find_spec("blip").submodule_search_locations[0])
                          / "configs" / "med_config.json").read_text())
        med_file = Path(tmp) / "med_config.json"
        med_file.write_text(json.dumps({**med, **sizes.med}))
        model = BLIP_VQA(med_config=str(med_file), image_size=sizes.vqa_image, vit="base")
    perturb(model, generator)
    model.eval()
    torch.save({"model": model.state_dict()}, out / "model_base_vqa_capfilt_large.pth")

    images = torch.randint(0, 256, (len(VQA_QUESTIONS), 3, sizes.vqa_image, sizes.vqa_image), generator=generator,
                           dtype=torch.uint8)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = (images.float() / 255.0 - mean) / std  # torchvision's ToTensor + Normalize
    probs: list[list[float]] = [[] for _ in VQA_QUESTIONS]
    slots = max(len(q) for q in VQA_QUESTIONS)
    with torch.no_grad():
        for slot in range(slots):
            which = [i for i, q in enumerate(VQA_QUESTIONS) if len(q) > slot]
            p = answer_slot(model, pixels[which], [VQA_QUESTIONS[i][slot] for i in which])
            for i, value in zip(which, p.tolist()):
                probs[i].append(value)
        lengths = [len(model.tokenizer(q).input_ids) for qs in VQA_QUESTIONS for q in qs]
    # T2I-CompBench: each answer written as '{:.4f}', read back, multiplied in a float32 tensor.
    answers = [[f"{p:.4f}" for p in row] for row in probs]
    scores = []
    for row in answers:
        reward = torch.ones((), dtype=torch.float32)
        for a in row:
            reward = reward * torch.tensor(float(a), dtype=torch.float32)
        scores.append(f"{reward.item():.4f}")
    torch.save({
        "questions": VQA_QUESTIONS, "images": images, "probs": [torch.tensor(r, dtype=torch.float64) for r in probs],
        "answers": answers, "scores": scores, "question_token_lengths": lengths,
    }, out / "vqa_reference.pt")


def init_one_process_group(tmp: Path) -> None:
    """LAVIS's forward gathers across processes (contrastive loss): a one-process gloo group, no network."""
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'dist'}", rank=0, world_size=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--vocab-dir", required=True, type=Path, help="folder with bert-base-uncased's vocab.txt")
    parser.add_argument("--full", action="store_true", help="the released models' sizes (about 8 GB of memory)")
    args = parser.parse_args()
    sizes = FULL if args.full else REDUCED
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)  # the originals' own initialisers draw from the global generator
    generator = torch.Generator().manual_seed(SEED)
    with tempfile.TemporaryDirectory() as tmp:
        init_one_process_group(Path(tmp))
        try:
            blip2_reference(args.out, args.vocab_dir, sizes, generator)
        finally:
            dist.destroy_process_group()
    vqa_reference(args.out, args.vocab_dir, sizes, generator)
    print(f"reference written to {args.out}")


if __name__ == "__main__":
    main()
