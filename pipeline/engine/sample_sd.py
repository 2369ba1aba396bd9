"""Plain Stable Diffusion sampling (``engine.generator: sd_sampling``): what GORS users do today.

diffusers' ``StableDiffusionPipeline`` built from the SD 1.5 parts already loaded for inversion
(``GeneratorModels``: the same VAE, UNet, text encoder and tokenizer objects, no second copy) and a
sampling scheduler made from the loaded scheduler's config. No safety checker (the scorer judges the
images). The settings are the ``sampling`` config section; the image size is ``latent.size`` x the
VAE's factor, as the inversion path decodes. The prompt goes in as written, with the empty negative
prompt, as T2I-CompBench samples its baselines (``sds.prefix`` is inversion's SDS condition only).

Same interface as ``InversionEngine``: ``run(requests) -> results`` in batches of ``engine.batch_size``.
Per sample, the starting latents come from the sample's own seed exactly as inversion draws its z0
(``generator(seed, "latent-init")`` on the CPU: the same start on every device) and a stochastic
scheduler's noise from one torch.Generator per sample: a sample's image does not depend on its
batch-mates (up to the kernels' float rounding across batch sizes, as for inversion). A sample whose
latents or image become non-finite is redone alone with a restart seed (``engine.max_restarts``).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pipeline.config import SAMPLING_SCHEDULERS, Config
from pipeline.engine.invert import (
    INJECT_NAN_ENV,
    SampleRequest,
    SampleResult,
    parse_nan_injection,
    restart_seed,
    run_in_batches,
)
from pipeline.engine.passes import autocast_for
from pipeline.engine.rng import generator, initial_latents
from pipeline.models.loading import GeneratorModels


def sampling_scheduler(models: GeneratorModels, name: str) -> Any:
    """A new scheduler of the named kind from the loaded scheduler's config (SD 1.5's betas, offsets)."""
    import diffusers

    cls = getattr(diffusers, SAMPLING_SCHEDULERS[name])
    return cls.from_config(models.scheduler.config)


def build_pipeline(models: GeneratorModels, scheduler_name: str) -> Any:
    """The diffusers pipeline over the loaded components (shared objects, not copies)."""
    from diffusers import StableDiffusionPipeline

    with warnings.catch_warnings():
        # The tiny and small sets' scheduler config lacks SD 1.5's steps_offset 1 / clip_sample false: the
        # pipeline sets them on its own scheduler (never on the loaded one) and says so in a FutureWarning.
        warnings.simplefilter("ignore", FutureWarning)
        pipe = StableDiffusionPipeline(
            vae=models.vae, text_encoder=models.text_encoder, tokenizer=models.clip_tokenizer, unet=models.unet,
            scheduler=sampling_scheduler(models, scheduler_name), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_schedule(scheduler: Any, name: str, steps: int) -> None:
    """Walk the scheduler's whole schedule once on a tiny latent (milliseconds), before any work: some
    settings inside the config's ranges cannot run (ddim or pndm at 1000 steps index past the trained
    timesteps; pndm's Runge-Kutta warm-up needs at least 4 steps), and would fail every shard alike."""
    import copy

    import torch

    from pipeline.config import ConfigError

    trial = copy.deepcopy(scheduler)  # stepping changes a scheduler's state
    try:
        trial.set_timesteps(steps)
        sample = torch.ones(1, 4, 4, 4) * trial.init_noise_sigma
        for t in trial.timesteps:
            trial.scale_model_input(sample, t)
            sample = trial.step(torch.zeros_like(sample), t, sample).prev_sample
        finite = bool(torch.isfinite(sample).all())
    except (IndexError, ValueError, RuntimeError) as err:
        why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:120]
        raise ConfigError(f"config: sampling.scheduler {name} cannot run sampling.steps={steps} ({why}); "
                          "choose fewer steps (at most 999) or at least 4 for pndm") from None
    if not finite:
        raise ConfigError(f"config: sampling.scheduler {name} gives non-finite latents at sampling.steps={steps}; "
                          "choose fewer steps")


def load_lora(pipe: Any, folder: str) -> None:
    """A ``referee-synth finetune`` LoRA (sampling.lora) into the pipeline's UNet and text encoder, scale 1."""
    import tempfile

    from pipeline.errors import ModelLoadError
    from pipeline.models.lora_files import local_lora_folder

    with tempfile.TemporaryDirectory(prefix="lora-") as tmp:
        try:
            pipe.load_lora_weights(local_lora_folder(folder, tmp))
        except (OSError, ValueError, RuntimeError) as err:
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise ModelLoadError(f"sampling.lora {folder!r} does not load into the base model ({reason})") from None


class SamplingEngine:
    def __init__(self, models: GeneratorModels, cfg: Config) -> None:
        self.models = models
        self.cfg = cfg
        self.device = models.device
        self.pipe = build_pipeline(models, cfg.sampling.scheduler)
        check_schedule(self.pipe.scheduler, cfg.sampling.scheduler, cfg.sampling.steps)
        if cfg.sampling.lora:
            load_lora(self.pipe, cfg.sampling.lora)

    @property
    def image_size(self) -> int:
        return self.cfg.latent.size * self.pipe.vae_scale_factor

    def run(
        self, requests: list[SampleRequest], progress: Callable[[int], None] | None = None
    ) -> list[SampleResult]:
        """Sample every request, in batches of ``engine.batch_size``; results in request order."""
        inject = parse_nan_injection(os.environ.get(INJECT_NAN_ENV))
        return run_in_batches(requests, self.cfg.engine.batch_size, lambda b: self._run_batch(b, inject), progress)

    def _run_batch(self, requests: Sequence[SampleRequest], inject) -> list[SampleResult]:
        seeds = [r.seed for r in requests]
        restarts: list[list[str]] = [[] for _ in requests]
        attempts = [0] * len(requests)
        seconds = [0.0] * len(requests)
        images: list[torch.Tensor | None] = [None] * len(requests)
        errors: list[str | None] = [None] * len(requests)
        pending = list(range(len(requests)))
        while pending:
            t0 = time.perf_counter()
            out, bad = self._sample([requests[i] for i in pending], [seeds[i] for i in pending],
                                    [attempts[i] for i in pending], inject)
            share = (time.perf_counter() - t0) / len(pending)
            retry = []
            for j, i in enumerate(pending):
                seconds[i] += share
                if bad[j] is None:
                    images[i], errors[i] = out[j], None
                elif attempts[i] < self.cfg.engine.max_restarts:
                    restarts[i].append(f"{bad[j]} (seed {seeds[i]})")
                    attempts[i] += 1
                    seeds[i] = restart_seed(seeds[i], attempts[i])
                    retry.append(i)
                else:
                    tries = attempts[i] + 1
                    errors[i] = f"{bad[j]} (seed {seeds[i]}); gave up after {tries} attempt{'s' if tries > 1 else ''}"
            pending = retry
        steps = self.cfg.sampling.steps
        return [
            SampleResult(request=r, image=images[i], itm_score=None, final_losses={}, iterations=steps,
                         seed=seeds[i], error=errors[i], trace=None, seconds=seconds[i], restarts=restarts[i])
            for i, r in enumerate(requests)
        ]

    def initial_latents(self, seeds: Sequence[int]) -> torch.Tensor:
        """z0 per sample, drawn as the inversion engine draws it (CPU, the sample's own stream)."""
        lc = self.cfg.latent
        return initial_latents(seeds, (self.models.unet.config.in_channels, lc.size, lc.size))

    @torch.no_grad()
    def _sample(self, requests: Sequence[SampleRequest], seeds: Sequence[int], attempts: Sequence[int],
                inject) -> tuple[torch.Tensor, list[str | None]]:
        """One pipeline call over the batch: [B, 3, H, W] float32 images on the CPU, and per sample the
        reason it must be redone (non-finite latents or image), else None."""
        sc = self.cfg.sampling
        step_noise = [generator(s, "sampling-steps", device=self.device) for s in seeds]
        nan_at: dict[int, int] = {}
        if inject is not None:
            pid, at, limit = inject
            nan_at = {b: at for b, r in enumerate(requests)
                      if r.prompt_id == pid and (limit is None or attempts[b] < limit)}
        bad_latents: set[int] = set()

        def on_step(pipe: Any, step: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            latents = kwargs["latents"]
            for b, at in nan_at.items():
                if step == at:
                    latents[b] = float("nan")
            flags = ~torch.isfinite(latents.flatten(1)).all(dim=1)
            bad_latents.update(b for b, f in enumerate(flags.tolist()) if f)
            return {"latents": latents}

        with autocast_for(self.cfg.engine.autocast, self.device):
            images = self.pipe(
                prompt=[r.prompt for r in requests], height=self.image_size, width=self.image_size,
                num_inference_steps=sc.steps, guidance_scale=sc.guidance_scale, generator=step_noise,
                latents=self.initial_latents(seeds).to(self.device, self.models.unet.dtype), output_type="pt",
                callback_on_step_end=on_step if nan_at else None,
            ).images
        images = images.float().cpu()
        nonfinite = ~torch.isfinite(images.flatten(1)).all(dim=1)
        bad: list[str | None] = []
        for b in range(len(requests)):
            if b in bad_latents:
                bad.append(f"non-finite latents at step {nan_at.get(b, 'unknown')}")
            elif bool(nonfinite[b]):
                bad.append("non-finite image")
            else:
                bad.append(None)
        return images, bad
