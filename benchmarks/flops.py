"""FLOPs of one image at the real model sizes, per component and in total, and the time floor.

    python benchmarks/flops.py --config configs/paper.yaml [--set k=v ...] [--tflops 989] [--json]

Every network is built at its real size from explicit configs (``benchmarks/real_models.py``)
with its weights on the ``meta`` device (nothing allocated), and each pass the engine makes is
run once under ``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions and attention
are counted (2 FLOPs per multiply-add); elementwise work (norms, activations, augmentations,
optimiser) is not. Backward passes are counted as the engine runs them: weights are frozen, so
only input gradients are computed (about 1x the forward for linear layers, not 2x).

Multiplicities per image come from the config and ``--category`` (``pipeline/engine/flop_floor.py``; DESIGN.md
section 6): with ``zoo.referees`` (``--config configs/zoo.yaml``) each referee that judges the category adds its
views (CLIP ViT-L/14, OWLv2 B/16 at 960 px: counted here at their real sizes); the category's scorer is counted
(BLIP-VQA, CLIPScore, the spatial rule's detection); ``monitor.enabled`` adds a decode and a scoring per check.
Inversion (``engine.generator: inversion``): ``optim.iterations`` joint
iterations, each with one VAE-decoder fwd+bwd, one referee fwd+bwd per kept view (``augment.top_k``
of ``num_views``, or all) plus a no-grad pass over all views when 0 < top_k < num_views, and one
classifier-free-guidance UNet forward (batch 2); ``optim.tail_iterations`` SDS-only iterations;
then one decode, one referee pass on the plain image, and BLIP-VQA scoring. Plain sampling
(``sd_sampling``, e.g. ``--config configs/sd15.yaml``): ``sampling.steps`` UNet passes on a batch of 2
(1 without guidance), the text encoder on the prompt and the empty negative prompt, one decode, scoring.

The floor is total FLOPs / ``--tflops``. The default 989 TFLOP/s is NVIDIA's dense (no sparsity)
BF16 tensor-core peak of the H100 SXM5, which the H200 shares; measured large-matmul rates are
about 600-750 on an H100 (benchmarks/gpu.py measures and reports its own).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks.real_models import RealModels, build_real_models, build_zoo_models, parameter_counts  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.config_loading import load_config  # noqa: E402
from pipeline.engine.flop_floor import (  # noqa: E402 - Assumptions and calls_per_image: shared with --plan
    DEFAULT_QUESTION_TOKENS,
    DEFAULT_QUESTIONS,
    DEFAULT_TEXT_TOKENS,
    Assumptions,
    calls_per_image,
)

H100_BF16_DENSE_TFLOPS = 989.0

META = torch.device("meta")


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _grad_input(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.zeros(shape, device=META).requires_grad_(True)


def _fwd_bwd(forward: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...]) -> int:
    """FLOPs of forward(x) and the backward to x (frozen weights: input gradients only)."""

    def run() -> None:
        out = forward(_grad_input(shape))
        out.backward(torch.ones_like(out))

    return count_flops(run)


def _fwd(forward: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...]) -> int:
    def run() -> None:
        with torch.no_grad():
            forward(torch.zeros(shape, device=META))

    return count_flops(run)


# ---- the referee's passes, through the engine's own code --------------------------------------


def _referee_stub(models: RealModels):
    """A ``pipeline.referees.blip2.Referee`` holding the meta model (no tokenizer needed)."""
    from pipeline.referees.blip2 import Referee

    ref = Referee.__new__(Referee)
    ref.model, ref.head = models.referee, models.caption_head
    ref.num_queries = models.referee.config.num_query_tokens
    ref.image_size = models.referee.config.vision_config.image_size
    return ref


def _text(tokens: int) -> SimpleNamespace:
    ids = torch.zeros(1, tokens, dtype=torch.long, device=META)
    return SimpleNamespace(ids=ids, mask=torch.ones(1, tokens, dtype=torch.bool, device=META))


def referee_counts(models: RealModels, text_tokens: int) -> dict[str, int]:
    from pipeline.referees.blip2 import bidirectional_mask, unilm_mask

    ref = _referee_stub(models)
    size = ref.image_size
    hidden = models.referee.config.vision_config.hidden_size
    tokens = (size // models.referee.config.vision_config.patch_size) ** 2 + 1
    text = _text(text_tokens)
    q = ref.num_queries

    def itm(embeds: torch.Tensor) -> torch.Tensor:  # ITM copy of the joint pass + ITM head
        h = ref.qformer_hidden(embeds, text.ids, bidirectional_mask(text.mask, q))
        return ref._itm_loss(h)

    def caption(embeds: torch.Tensor) -> torch.Tensor:  # caption copy + LM head on the T-1 predicting positions
        h = ref.qformer_hidden(embeds, text.ids, unilm_mask(text.mask, q))
        return ref.head(h[:, q:-1])

    def vit_pass(pixels: torch.Tensor) -> torch.Tensor:
        return ref.image_embeds(pixels)

    pixels, embeds = (1, 3, size, size), (1, tokens, hidden)
    return {
        "referee_vit_fwd_bwd": _fwd_bwd(vit_pass, pixels),
        "referee_vit_fwd": _fwd(vit_pass, pixels),
        "qformer_itm_fwd_bwd": _fwd_bwd(itm, embeds),
        "qformer_itm_fwd": _fwd(itm, embeds),
        "qformer_caption_fwd_bwd": _fwd_bwd(caption, embeds),
        "qformer_caption_fwd": _fwd(caption, embeds),
    }


# ---- SD parts ---------------------------------------------------------------------------------


def sd_counts(models: RealModels, cfg: Config) -> dict[str, int]:
    lc = cfg.latent
    latent = (1, lc.channels, lc.size, lc.size)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return models.vae.decode(z / lc.scale).sample

    def unet(batch: int) -> None:
        with torch.no_grad():
            z = torch.zeros(batch, lc.channels, lc.size, lc.size, device=META)
            t = torch.zeros(batch, dtype=torch.long, device=META)
            emb = torch.zeros(batch, 77, models.unet.config.cross_attention_dim, device=META)
            models.unet(z, t, encoder_hidden_states=emb)

    def text_encoder() -> None:
        with torch.no_grad():
            models.text_encoder(torch.zeros(1, 77, dtype=torch.long, device=META))

    return {
        "vae_decoder_fwd_bwd": _fwd_bwd(decode, latent),
        "vae_decoder_fwd": _fwd(decode, latent),
        "unet_cfg_fwd": count_flops(lambda: unet(2)),
        "unet_fwd": count_flops(lambda: unet(1)),
        "clip_text_fwd": count_flops(text_encoder),
    }


# ---- BLIP-VQA ---------------------------------------------------------------------------------


def vqa_counts(models: RealModels, cfg: Config, question_tokens: int) -> dict[str, int]:
    """The calls of ``VqaScorer``: one vision pass per image; per question the text encoder over the
    question (cross-attending to the image tokens) and one decoder step from [DEC]. The all-ones
    attention masks the scorer passes are left out here (transformers inspects their values, which
    meta tensors do not have); they change no FLOPs."""
    vqa = models.vqa
    vc = vqa.config.vision_config
    size = cfg.vqa.image_size
    interpolate = size != vc.image_size
    tokens = (size // vc.patch_size) ** 2 + 1

    def vision() -> None:
        with torch.no_grad():
            px = torch.zeros(1, 3, size, size, device=META)
            vqa.vision_model(pixel_values=px, interpolate_pos_encoding=interpolate)

    def question() -> None:
        with torch.no_grad():
            embeds = torch.zeros(1, tokens, vc.hidden_size, device=META)
            ids = torch.zeros(1, question_tokens, dtype=torch.long, device=META)
            states = vqa.text_encoder(input_ids=ids, encoder_hidden_states=embeds).last_hidden_state
            start = torch.zeros(1, 1, dtype=torch.long, device=META)
            vqa.text_decoder(input_ids=start, encoder_hidden_states=states, use_cache=False)

    return {"vqa_vision_fwd": count_flops(vision), "vqa_question_fwd": count_flops(question)}


# ---- the zoo referees and the other scorers ----------------------------------------------------


def zoo_counts(zoo) -> dict[str, int]:
    """Per view: the CLIP referee (image features of one view; its text features are computed once per
    prompt) and the detector referee (OWLv2's image embedder, class head on the two queries, box head:
    ``pipeline/referees/detector.py`` ``detections``); per scored image: CLIPScore (ViT-B/32 image + 77-token
    text) and the spatial rule's OWLv2 detection (image embedder, two 16-token queries, both heads)."""
    clip, owl = zoo.clip_large, zoo.owlv2
    clip_px = (1, 3, clip.config.vision_config.image_size, clip.config.vision_config.image_size)
    owl_size = owl.config.vision_config.image_size
    owl_px = (1, 3, owl_size, owl_size)

    def clip_view(px: torch.Tensor) -> torch.Tensor:
        return clip.get_image_features(pixel_values=px).pooler_output

    def owl_view(px: torch.Tensor, text: bool = False) -> torch.Tensor:
        feature_map, _ = owl.image_embedder(pixel_values=px)
        n, h, w, d = feature_map.shape
        feats = feature_map.reshape(n, h * w, d)
        queries = torch.zeros(n, 2, owl.config.projection_dim, device=px.device)
        if text:
            ids = torch.zeros(2, owl.config.text_config.max_position_embeddings, dtype=torch.long, device=META)
            owl.owlv2.get_text_features(input_ids=ids)
        logits, _ = owl.class_predictor(feats, queries, None)
        boxes = owl.box_predictor(feats, feature_map)
        return logits.sum() + boxes.sum()

    def clipscore() -> None:
        with torch.no_grad():
            score = zoo.clip_score
            size = score.config.vision_config.image_size
            score.get_image_features(pixel_values=torch.zeros(1, 3, size, size, device=META))
            score.get_text_features(input_ids=torch.zeros(1, 77, dtype=torch.long, device=META))

    def detect() -> None:
        with torch.no_grad():
            owl_view(torch.zeros(owl_px, device=META), text=True)

    return {
        "clip_referee_fwd_bwd": _fwd_bwd(clip_view, clip_px), "clip_referee_fwd": _fwd(clip_view, clip_px),
        "detector_referee_fwd_bwd": _fwd_bwd(owl_view, owl_px), "detector_referee_fwd": _fwd(owl_view, owl_px),
        "clipscore_fwd": count_flops(clipscore), "spatial_detect_fwd": count_flops(detect),
    }


# ---- per image ---------------------------------------------------------------------------------


DESCRIPTIONS = {
    "referee_vit_fwd_bwd": "BLIP-2 ViT-g/14 fwd+bwd, one view",
    "referee_vit_fwd": "BLIP-2 ViT-g/14 fwd (no grad), one view",
    "qformer_itm_fwd_bwd": "Q-Former ITM pass + ITM head fwd+bwd, one view",
    "qformer_itm_fwd": "Q-Former ITM pass fwd (no grad), one view",
    "qformer_caption_fwd_bwd": "Q-Former caption pass + LM head fwd+bwd, one view",
    "qformer_caption_fwd": "Q-Former caption pass fwd (no grad), one view",
    "vae_decoder_fwd_bwd": "SD VAE decoder fwd+bwd (64x64 latent -> 512 px)",
    "vae_decoder_fwd": "SD VAE decoder fwd (final image)",
    "unet_cfg_fwd": "SD-1.5 UNet fwd, batch 2 (uncond + cond)",
    "unet_fwd": "SD-1.5 UNet fwd, batch 1 (sampling without guidance)",
    "clip_text_fwd": "CLIP-L text encoder fwd, 77 tokens",
    "vqa_vision_fwd": "BLIP ViT-B/16 fwd at the VQA size",
    "vqa_question_fwd": "BLIP text encoder + first decoder step, one question",
    "vae_decoder_bwd": "SD VAE decoder bwd alone (each further zoo referee, per_referee balance)",
    "clip_referee_fwd_bwd": "zoo CLIP ViT-L/14 image features fwd+bwd, one view",
    "clip_referee_fwd": "zoo CLIP ViT-L/14 image features fwd (no grad), one view",
    "detector_referee_fwd_bwd": "zoo OWLv2 B/16 960 px embedder + heads fwd+bwd, one view",
    "detector_referee_fwd": "zoo OWLv2 B/16 960 px embedder + heads fwd (no grad), one view",
    "clipscore_fwd": "CLIPScore ViT-B/32 image + 77-token text fwd",
    "spatial_detect_fwd": "spatial rule: OWLv2 B/16 detection at 960 px, two queries",
}


def analytic_vit_flops(vision_config: Any, backward: bool) -> float:
    """Closed-form FLOPs of the ViT (independent of the counter): patch embedding, per layer
    2 x tokens x (4 d^2 + 2 d m) for the linear layers and 2 x 2 x tokens^2 x d for attention.
    Backward with frozen weights: 1x the linear and patch terms (input gradients), 2x attention."""
    d, m, layers = vision_config.hidden_size, vision_config.intermediate_size, vision_config.num_hidden_layers
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    tokens = patches + 1
    patch = 2 * patches * 3 * vision_config.patch_size**2 * d
    linear = layers * 2 * tokens * (4 * d * d + 2 * d * m)
    attention = layers * 4 * tokens * tokens * d
    if not backward:
        return patch + linear + attention
    return 2 * (patch + linear) + 3 * attention


def per_call_flops(models: RealModels, zoo, cfg: Config, a: Assumptions) -> dict[str, int]:
    """FLOPs of one call of every counted pass of these models (meta-device modules: nothing runs)."""
    per_call: dict[str, int] = {}
    per_call.update(referee_counts(models, a.text_tokens))
    per_call.update(sd_counts(models, cfg))
    per_call.update(vqa_counts(models, cfg, a.question_tokens))
    per_call["vae_decoder_bwd"] = per_call["vae_decoder_fwd_bwd"] - per_call["vae_decoder_fwd"]
    per_call.update(zoo_counts(zoo))
    return per_call


def on_meta(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of a loaded module on the meta device (to count its passes with the functions above)."""
    import copy

    return copy.deepcopy(module).to("meta")


def count(cfg: Config, tflops: float = H100_BF16_DENSE_TFLOPS, a: Assumptions | None = None,
          category: str | None = None) -> dict[str, Any]:
    a = a or Assumptions()
    models = build_real_models("meta")
    per_call = per_call_flops(models, build_zoo_models("meta"), cfg, a)
    calls = calls_per_image(cfg, a, category)
    components = {}
    total = 0
    for name, flops in per_call.items():
        per_image = flops * calls[name]
        total += per_image
        components[name] = {
            "description": DESCRIPTIONS[name], "flops_per_call": flops, "calls_per_image": calls[name],
            "flops_per_image": per_image,
        }
    for c in components.values():
        c["share"] = c["flops_per_image"] / total if total else 0.0
    vit_cfg = models.referee.config.vision_config
    analytic = analytic_vit_flops(vit_cfg, backward=True)
    floor = total / (tflops * 1e12)
    return {
        "total_flops": total,
        "tflops": tflops,
        "floor_seconds_per_image": floor,
        "floor_images_per_hour": 3600 / floor if floor else 0.0,
        "components": components,
        "groups": _groups(components, total),
        "analytic_check": {
            "referee_vit_fwd_bwd_counted": per_call["referee_vit_fwd_bwd"],
            "referee_vit_fwd_bwd_analytic": analytic,
            "ratio": per_call["referee_vit_fwd_bwd"] / analytic,
        },
        "assumptions": {
            "text_tokens": a.text_tokens, "questions": a.questions, "question_tokens": a.question_tokens,
            "iterations": cfg.optim.iterations, "tail_iterations": cfg.optim.tail_iterations,
            "num_views": cfg.augment.num_views, "top_k": cfg.augment.top_k, "latent_size": cfg.latent.size,
            "vqa_image_size": cfg.vqa.image_size, "generator": cfg.engine.generator,
            "sampling_steps": cfg.sampling.steps, "guidance_scale": cfg.sampling.guidance_scale,
            "category": category, "zoo_referees": [r.kind for r in cfg.zoo.referees],
            "monitor_every": cfg.monitor.every if cfg.monitor.enabled else None,
        },
        "parameters": parameter_counts(models),
    }


def _groups(components: dict[str, dict[str, Any]], total: int) -> dict[str, dict[str, float]]:
    groups = {"referee_vit": ("referee_vit_",), "qformer": ("qformer_",), "vae_decoder": ("vae_decoder_",),
              "zoo_referees": ("clip_referee_", "detector_referee_"), "other_scorers": ("clipscore_", "spatial_"),
              "unet": ("unet_",), "text_encoder": ("clip_text_",), "vqa": ("vqa_",)}
    out = {}
    for g, prefixes in groups.items():
        flops = sum(c["flops_per_image"] for n, c in components.items() if n.startswith(prefixes))
        out[g] = {"flops_per_image": flops, "share": flops / total if total else 0.0}
    return out


def format_table(result: dict[str, Any]) -> str:
    rows = [f"{'component':26s} {'GFLOP/call':>12s} {'calls/img':>10s} {'TFLOP/img':>11s} {'share':>7s}"]
    for name, c in result["components"].items():
        rows.append(f"{name:26s} {c['flops_per_call'] / 1e9:12.2f} {c['calls_per_image']:10g} "
                    f"{c['flops_per_image'] / 1e12:11.2f} {100 * c['share']:6.2f}%")
    rows.append("-" * 70)
    for g, c in result["groups"].items():
        rows.append(f"{'  ' + g:26s} {'':12s} {'':10s} {c['flops_per_image'] / 1e12:11.2f} {100 * c['share']:6.2f}%")
    total = result["total_flops"]
    floor = result["floor_seconds_per_image"]
    chk = result["analytic_check"]
    rows += [
        f"{'total per image':26s} {'':12s} {'':10s} {total / 1e12:11.2f}  ({total / 1e15:.3f} PFLOP)",
        f"floor at {result['tflops']:.0f} TFLOP/s: {floor:.2f} s/image ({result['floor_images_per_hour']:.0f} "
        f"images/hour); the 2x goal: {2 * floor:.2f} s/image",
        f"ViT fwd+bwd per view: counted {chk['referee_vit_fwd_bwd_counted'] / 1e9:.1f} GFLOP, analytic "
        f"{chk['referee_vit_fwd_bwd_analytic'] / 1e9:.1f} GFLOP (ratio {chk['ratio']:.4f})",
    ]
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML preset (default: the built-in defaults = configs/paper.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    p.add_argument("--tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                   help="device rate for the floor (default 989: H100/H200 dense BF16 peak)")
    p.add_argument("--text-tokens", type=int, default=DEFAULT_TEXT_TOKENS, help="referee text length incl. specials")
    p.add_argument("--questions", type=int, default=DEFAULT_QUESTIONS, help="VQA questions per image")
    p.add_argument("--question-tokens", type=int, default=DEFAULT_QUESTION_TOKENS)
    p.add_argument("--category", default=None,
                   help="prompt category: picks the zoo referees that judge it and its scorer (default: none)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.set)
    result = count(cfg, args.tflops, Assumptions(args.text_tokens, args.questions, args.question_tokens), args.category)
    result["config"] = args.config or "defaults"
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
