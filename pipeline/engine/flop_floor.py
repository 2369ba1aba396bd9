"""FLOPs of one image without torch: per-pass counts at the real model sizes times the config's calls.

``benchmarks/flops.py`` counts each pass once on the ``meta`` device (FlopCounterMode); its counts at
the real sizes, 512 px (64x64 latents) and a 480 px VQA image, are recorded here so that the driver
can plan a run (``jobs/synthesize.py --plan``) without importing torch. ``tests/benchmarks/
test_flops.py`` checks these numbers against the counter. The multiplicities per image follow the
config (DESIGN.md section 6), so iterations, views and top-k change the total; the model sizes do not
(a tiny or small model set is planned as if it were the real one). ``engine.generator: sd_sampling``
counts plain sampling instead: ``sampling.steps`` UNet passes, one decode, the text encoder, scoring.
"""

from __future__ import annotations

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
}


@dataclass
class Assumptions:
    text_tokens: int = DEFAULT_TEXT_TOKENS
    questions: int = DEFAULT_QUESTIONS
    question_tokens: int = DEFAULT_QUESTION_TOKENS


def calls_per_image(cfg: Config, a: Assumptions) -> dict[str, int]:
    """Calls of every counted pass for one image, for the config's generator (0 for passes it never makes)."""
    calls = dict.fromkeys(REAL_FLOPS_PER_CALL, 0)
    if cfg.engine.generator == "sd_sampling":
        calls.update(_sampling_calls(cfg))
    else:
        calls.update(_inversion_calls(cfg))
    calls.update(vqa_vision_fwd=1, vqa_question_fwd=a.questions)
    return calls


def _sampling_calls(cfg: Config) -> dict[str, int]:
    """diffusers' StableDiffusionPipeline: per step one UNet pass on uncond + cond (batch 2), or on cond
    alone when guidance_scale <= 1 (no classifier-free guidance); the text encoder on the prompt and on
    the empty negative prompt; one VAE decode."""
    guided = cfg.sampling.guidance_scale > 1.0
    steps = cfg.sampling.steps
    return {
        "unet_cfg_fwd": steps if guided else 0,
        "unet_fwd": 0 if guided else steps,
        "clip_text_fwd": 2 if guided else 1,
        "vae_decoder_fwd": 1,
    }


def _inversion_calls(cfg: Config) -> dict[str, int]:
    it, tail = cfg.optim.iterations, cfg.optim.tail_iterations
    n, k = cfg.augment.num_views, cfg.augment.top_k
    select = 0 < k < n
    kept = k if select else n
    no_grad_views = (it * n if select else 0) + 1  # selection passes + the final plain-image score
    return {
        "referee_vit_fwd_bwd": it * kept,
        "referee_vit_fwd": no_grad_views,
        "qformer_itm_fwd_bwd": it * kept,
        "qformer_itm_fwd": no_grad_views,
        "qformer_caption_fwd_bwd": it * kept,
        "qformer_caption_fwd": no_grad_views,
        "vae_decoder_fwd_bwd": it,
        "vae_decoder_fwd": 1,
        "unet_cfg_fwd": it + tail,
        "clip_text_fwd": 1,  # the condition, once per prompt; the unconditional "" once per engine
    }


def floor_per_image(cfg: Config, tflops: float, efficiency: float) -> dict[str, Any]:
    """FLOPs of one image at the real sizes and its seconds at ``tflops`` x ``efficiency``."""
    calls = calls_per_image(cfg, Assumptions())
    total = sum(REAL_FLOPS_PER_CALL[name] * n for name, n in calls.items())
    return {
        "flops_per_image": total, "tflops": tflops, "efficiency": efficiency,
        "seconds_per_image": total / (tflops * 1e12 * efficiency),
        "floor_seconds_per_image": total / (tflops * 1e12),
    }
