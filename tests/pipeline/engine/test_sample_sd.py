"""Plain SD sampling (engine.generator sd_sampling) on the tiny models: shared components, seeds, batching."""

from __future__ import annotations

import pytest
import torch

from pipeline.engine.invert import INJECT_NAN_ENV, InversionEngine, SampleRequest, restart_seed
from pipeline.engine.sample_sd import SamplingEngine
from tests.conftest import compbench_prompts
from tests.pipeline.engine.engine_inputs import with_changes

# Float results that depend on the CPU's kernels: `make test-numerics` runs them on other kernel paths.
pytestmark = pytest.mark.numerics

PROMPTS = compbench_prompts("color_val", 5)
STEPS = 4  # a short schedule keeps the CPU tests fast; the code path is the full one


def _cfg(base, **changes):
    """A copy of the tiny config with ``section__key=value`` changes, generator sd_sampling."""
    return with_changes(base, **{"engine__generator": "sd_sampling", "sampling__steps": STEPS, **changes})


def _req(i: int, seed: int | None = None) -> SampleRequest:
    return SampleRequest(PROMPTS[i], f"p{i}", 0, 500 + i if seed is None else seed)


@pytest.fixture(scope="module")
def engine(generator_models, tiny_cfg) -> SamplingEngine:
    return SamplingEngine(generator_models, _cfg(tiny_cfg))


@pytest.fixture(scope="module")
def batch_of_3(engine):
    return engine.run([_req(0), _req(1), _req(2)])


def test_pipeline_shares_the_loaded_components(engine, generator_models) -> None:
    pipe = engine.pipe
    assert pipe.vae is generator_models.vae and pipe.unet is generator_models.unet
    assert pipe.text_encoder is generator_models.text_encoder and pipe.tokenizer is generator_models.clip_tokenizer
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    # A sampling scheduler of its own (DDIM by default), on the loaded noise schedule.
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler is not generator_models.scheduler
    assert torch.equal(pipe.scheduler.alphas_cumprod, generator_models.scheduler.alphas_cumprod)


def test_results_have_the_contracted_fields(batch_of_3) -> None:
    for i, r in enumerate(batch_of_3):
        assert r.request == _req(i) and r.error is None and r.seed == 500 + i and r.restarts == []
        assert r.image.shape == (3, 64, 64) and r.image.dtype == torch.float32 and r.image.device.type == "cpu"
        assert 0 <= float(r.image.min()) and float(r.image.max()) <= 1
        assert r.iterations == STEPS and r.itm_score is None and r.final_losses == {} and r.seconds > 0


def test_same_seed_same_image_and_the_inversion_paths_start(engine, generator_models, tiny_cfg, batch_of_3) -> None:
    again = engine.run([_req(0), _req(1), _req(2)])
    for a, b in zip(batch_of_3, again):
        assert torch.equal(a.image, b.image)
    other_seed = engine.run([_req(0, seed=9), _req(1), _req(2)])
    assert not torch.allclose(other_seed[0].image, batch_of_3[0].image)
    # z0 is the inversion engine's z0 for the same seed.
    inv = InversionEngine(generator_models, tiny_cfg)
    assert torch.equal(engine.initial_latents([500, 501]), inv._initial_latents([500, 501]))


def test_a_samples_image_does_not_depend_on_its_batch_mates(engine, batch_of_3) -> None:
    mates = engine.run([_req(0), _req(3), _req(4)])  # same position, other prompts and seeds beside it
    assert torch.allclose(mates[0].image, batch_of_3[0].image, atol=1e-5)
    alone = engine.run([_req(1)])  # another batch size: same up to the kernels' rounding
    assert torch.allclose(alone[0].image, batch_of_3[1].image, atol=1e-4)
    assert not torch.allclose(batch_of_3[0].image, batch_of_3[1].image, atol=1e-2)


def _unet_batches(engine: SamplingEngine, requests: list[SampleRequest]) -> list[int]:
    sizes: list[int] = []
    hook = engine.pipe.unet.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    try:
        engine.run(requests)
    finally:
        hook.remove()
    return sizes


def test_steps_and_guidance_are_honoured(generator_models, tiny_cfg, engine, batch_of_3) -> None:
    # Classifier-free guidance: one UNet pass on uncond + cond (2 x batch) per step.
    assert _unet_batches(engine, [_req(0), _req(1)]) == [4] * STEPS
    six = SamplingEngine(generator_models, _cfg(tiny_cfg, sampling__steps=6))
    assert _unet_batches(six, [_req(0)]) == [2] * 6
    assert six.run([_req(0)])[0].iterations == 6
    no_cfg = SamplingEngine(generator_models, _cfg(tiny_cfg, sampling__guidance_scale=1.0))
    assert _unet_batches(no_cfg, [_req(0)]) == [1] * STEPS  # guidance 1: the conditional pass only
    strong = SamplingEngine(generator_models, _cfg(tiny_cfg, sampling__guidance_scale=15.0)).run([_req(0)])
    assert not torch.allclose(strong[0].image, batch_of_3[0].image, atol=1e-3)


def test_scheduler_choice(generator_models, tiny_cfg) -> None:
    pndm = SamplingEngine(generator_models, _cfg(tiny_cfg, sampling__scheduler="pndm"))
    assert type(pndm.pipe.scheduler).__name__ == "PNDMScheduler"
    out = pndm.run([_req(0)])[0]
    assert out.error is None and torch.isfinite(out.image).all()


def test_non_finite_latents_restart_with_a_new_seed(engine, batch_of_3, monkeypatch) -> None:
    monkeypatch.setenv(INJECT_NAN_ENV, "p1:2:1")  # p1's latents go NaN at step 2 of its first attempt
    out = engine.run([_req(0), _req(1), _req(2)])
    assert out[1].error is None and out[1].seed == restart_seed(501, 1) and len(out[1].restarts) == 1
    assert "non-finite latents at step 2" in out[1].restarts[0]
    assert torch.isfinite(out[1].image).all()
    assert torch.allclose(out[0].image, batch_of_3[0].image, atol=1e-5)  # batch-mates untouched
    monkeypatch.setenv(INJECT_NAN_ENV, "p1:1")  # every attempt: failed after max_restarts + 1
    out = engine.run([_req(0), _req(1)])
    assert out[1].image is None and "gave up after 3 attempts" in out[1].error and out[0].error is None


@pytest.mark.parametrize(("scheduler", "steps"), [("ddim", 1000), ("pndm", 1000), ("pndm", 1), ("dpmsolver", 1000)])
def test_a_schedule_the_scheduler_cannot_run_is_a_config_error_before_any_work(generator_models, tiny_cfg,
                                                                                 scheduler, steps) -> None:
    """Issue 33, class 11: inside the config's ranges, but the scheduler cannot run it: one line at start."""
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=f"sampling.scheduler {scheduler} .*sampling.steps={steps}"):
        SamplingEngine(generator_models, _cfg(tiny_cfg, sampling__scheduler=scheduler, sampling__steps=steps))


def test_the_schedule_check_leaves_the_pipelines_scheduler_untouched(engine) -> None:
    from pipeline.engine.sample_sd import check_schedule

    before = list(engine.pipe.scheduler.timesteps)
    check_schedule(engine.pipe.scheduler, "ddim", 999)
    assert list(engine.pipe.scheduler.timesteps) == before
