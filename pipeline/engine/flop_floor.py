"""FLOPs of one image without torch: per-pass counts at the real model sizes times the config's calls.

``benchmarks/flops.py`` counts each pass once on the ``meta`` device (FlopCounterMode); its counts at
the real sizes, 512 px (64x64 latents) and a 480 px VQA image, are recorded here so that the driver
can plan a run (``jobs/synthesize.py --plan``) without importing torch. ``tests/benchmarks/
test_flops.py`` checks these numbers against the counter. The multiplicities per image follow the
config (DESIGN.md section 6), so iterations, views and top-k change the total; the model sizes do not
(a tiny or small model set is planned as if it were the real one). ``engine.generator: sd_sampling``
counts plain sampling instead: ``sampling.steps`` UNet passes, one decode, the text encoder, scoring.

Counted per category, as the run makes them: the zoo's referees (``zoo.referees``: each active referee's
views, its top-k selection pass, one more VAE-decoder backward per further referee under ``per_referee``;
the zoo models are those of configs/zoo.yaml: CLIP ViT-L/14, OWLv2 B/16), the category's scorer
(``scoring.by_category``: BLIP-VQA, CLIPScore, the spatial rule's detection, or all three), and with
``monitor.enabled`` one decode and one scoring per check. Early exit shortens the referee phase: the caller
gives the mean referee iterations a sample runs (``joint_iterations``, from an earlier run's exits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config

DEFAULT_TEXT_TOKENS = 12  # [CLS] + ~10 word pieces + [SEP]: a typical T2I-CompBench prompt
DEFAULT_QUESTIONS = 2  # noun chunks of a typical prompt ("a red car", "a blue bird")
DEFAULT_QUESTION_TOKENS = 6  # [ENC] a red car ? [SEP]

# FLOPs of one call, real sizes (benchmarks/flops.py --config configs/paper.yaml --json, flops_per_call).
REAL_FLOPS_PER_CALL: dict[str, int] = {
    "referee_vit_fwd_bwd": 1055946051072,
    "referee_vit_fwd": 520719260160,
    "qformer_itm_fwd_bwd": 29479845888,
    "qformer_itm_fwd": 14820016128,
    "qformer_caption_fwd_bwd": 30537034752,
    "qformer_caption_fwd": 15348610560,
    "vae_decoder_fwd_bwd": 5063397605376,
    "vae_decoder_fwd": 2514518933504,
    "unet_cfg_fwd": 1606546882560,
    "unet_fwd": 803273441280,
    "clip_text_fwd": 13298503680,
    "vqa_vision_fwd": 184040165376,
    "vqa_question_fwd": 27314780160,
    "vae_decoder_bwd": 2548878671872,
    "clip_referee_fwd_bwd": 330543955968,
    "clip_referee_fwd": 162025537536,
    "detector_referee_fwd_bwd": 2688691286016,
    "detector_referee_fwd": 1105334194176,
    "clipscore_fwd": 14777163776,
    "spatial_detect_fwd": 1107763744768,
}
# The zoo kinds' passes (configs/zoo.yaml's models) and each scorer's passes per scored image.
ZOO_PASSES = {"clip": "clip_referee", "detector": "detector_referee"}
SCORER_PASSES = {"blip_vqa": ("vqa",), "clipscore": ("clipscore",), "spatial_detector": ("spatial",),
                 "three_in_one": ("vqa", "clipscore", "spatial")}


@dataclass
class Assumptions:
    text_tokens: int = DEFAULT_TEXT_TOKENS
    questions: int = DEFAULT_QUESTIONS
    question_tokens: int = DEFAULT_QUESTION_TOKENS


def calls_per_image(cfg: Config, a: Assumptions, category: str | None = None,
                    joint_iterations: float | None = None) -> dict[str, float]:
    """Calls of every counted pass for one image of ``category``, for the config's generator (0 for passes it
    never makes). ``joint_iterations``: the mean referee iterations a sample runs (early exit); default all."""
    calls: dict[str, float] = dict.fromkeys(REAL_FLOPS_PER_CALL, 0)
    if cfg.engine.generator == "sd_sampling":
        calls.update(_sampling_calls(cfg))
    else:
        it = cfg.optim.iterations if joint_iterations is None else min(joint_iterations, cfg.optim.iterations)
        calls.update(_inversion_calls(cfg, category, it))
        if cfg.monitor.enabled:
            full = cfg.optim.iterations
            # at every, 2 every, ... before the end; an exit happens at a check, so a shortened run has it/every
            checks = it / cfg.monitor.every if it < full else max(0, math.ceil(full / cfg.monitor.every) - 1)
            calls["vae_decoder_fwd"] += checks
            _add_scoring(calls, cfg, category, a, checks)
    _add_scoring(calls, cfg, category, a, 1)
    return calls


def _add_scoring(calls: dict[str, float], cfg: Config, category: str | None, a: Assumptions, times: float) -> None:
    scorer = cfg.scoring.by_category.get(category or "", cfg.scoring.default)
    for part in SCORER_PASSES.get(scorer, ("vqa",)):
        if part == "vqa":
            calls["vqa_vision_fwd"] += times
            calls["vqa_question_fwd"] += times * a.questions
        elif part == "clipscore":
            calls["clipscore_fwd"] += times
        else:
            calls["spatial_detect_fwd"] += times


def _sampling_calls(cfg: Config) -> dict[str, int]:
    """diffusers' StableDiffusionPipeline: per step one UNet pass on uncond + cond (batch 2), or on cond
    alone when guidance_scale <= 1 (no classifier-free guidance); the text encoder on the prompt and on
    the empty negative prompt; one VAE decode. No BLIP-2 (it is not even loaded)."""
    guided = cfg.sampling.guidance_scale > 1.0
    steps = cfg.sampling.steps
    return {
        "unet_cfg_fwd": steps if guided else 0,
        "unet_fwd": 0 if guided else steps,
        "clip_text_fwd": 2 if guided else 1,
        "vae_decoder_fwd": 1,
    }


def _views(cfg: Config, n: int, it: float) -> tuple[float, float]:
    """(fwd+bwd view passes, no-grad view passes) of one referee with n views over it iterations."""
    k = cfg.augment.top_k
    select = 0 < k < n
    return it * (k if select else n), (it * n if select else 0) + 1  # + the final plain-image score


def _active_referees(cfg: Config, category: str | None) -> list[tuple[str, int]]:
    """(kind, views) of the referees that judge a sample of this category: the paper's BLIP-2 alone without a
    zoo; the zoo's entries with weight > 0 whose categories include it (or are empty)."""
    if not cfg.zoo.referees:
        return [("blip2", cfg.augment.num_views)]
    return [(r.kind, r.views or cfg.augment.num_views) for r in cfg.zoo.referees
            if r.weight > 0 and (not r.categories or category in r.categories)]


def _inversion_calls(cfg: Config, category: str | None, it: float) -> dict[str, float]:
    tail = cfg.optim.tail_iterations
    calls: dict[str, float] = {
        "vae_decoder_fwd_bwd": it,
        "vae_decoder_fwd": 1,
        "unet_cfg_fwd": it + tail,
        "clip_text_fwd": 1,  # the condition, once per prompt; the unconditional "" once per engine
    }
    active = _active_referees(cfg, category)
    for kind, n in active:
        grad, plain = _views(cfg, n, it)
        names = (("referee_vit", "qformer_itm", "qformer_caption") if kind == "blip2" else (ZOO_PASSES[kind],))
        for name in names:
            calls[f"{name}_fwd_bwd"] = calls.get(f"{name}_fwd_bwd", 0) + grad
            calls[f"{name}_fwd"] = calls.get(f"{name}_fwd", 0) + plain
    if cfg.zoo.referees and cfg.zoo.balance == "per_referee" and len(active) > 1:
        calls["vae_decoder_bwd"] = it * (len(active) - 1)  # one decoder backward per further referee
    return calls


def floor_per_image(cfg: Config, tflops: float, efficiency: float, category: str | None = None,
                    joint_iterations: float | None = None) -> dict[str, Any]:
    """FLOPs of one image of ``category`` at the real sizes and its seconds at ``tflops`` x ``efficiency``."""
    calls = calls_per_image(cfg, Assumptions(), category, joint_iterations)
    total = sum(REAL_FLOPS_PER_CALL[name] * n for name, n in calls.items())
    return {
        "flops_per_image": total, "tflops": tflops, "efficiency": efficiency,
        "seconds_per_image": total / (tflops * 1e12 * efficiency),
        "floor_seconds_per_image": total / (tflops * 1e12),
    }
