"""Training lowers the loss; the saved LoRA is what diffusers loads, changes the UNet, and unloads exactly."""

from __future__ import annotations

import torch

from pipeline.config_loading import load_config, preset_path
from pipeline.finetune.lora import adapted_layers, save_lora
from pipeline.finetune.loss import training_loss
from pipeline.finetune.train import build_loop
from pipeline.models.lora_files import LORA_FILE


def _eval_loss(loop, batch) -> float:
    images, captions, rewards = batch
    with torch.no_grad():  # fixed draws (step 0): only the weights change between two evaluations
        return float(training_loss(loop.parts, images, captions, rewards, seed=1, step=0, indices=[0, 1])[0])


def test_thirty_steps_on_one_batch_lower_the_loss_and_the_lora_round_trips(tiny_cache, fixed_batch, tmp_path) -> None:
    cfg = load_config(preset_path("tiny"), [f"models.tiny_cache_dir={tiny_cache}", "finetune.lr_unet=0.01",
                                            "finetune.lr_text=0.001"])
    loop = build_loop(cfg)
    assert adapted_layers(loop.parts.unet) == 32  # 2 transformer blocks x 2 attentions x (q, k, v, out)
    assert adapted_layers(loop.parts.text_encoder) == 8  # 2 layers x (q, k, v, out)
    before = _eval_loss(loop, fixed_batch)
    for _ in range(30):
        loop.train_step(*fixed_batch)
    after = _eval_loss(loop, fixed_batch)
    assert after < before * 0.9, (before, after)

    save_lora(tmp_path, loop.parts.unet, loop.parts.text_encoder, cfg.finetune)
    assert (tmp_path / LORA_FILE).is_file()
    _check_load_and_unload(cfg, tmp_path)


def _check_load_and_unload(cfg, folder) -> None:
    """A fresh pipeline of the base model: load_lora_weights changes the UNet's and the text encoder's output;
    unload_lora_weights restores both bit for bit."""
    from pipeline.engine.sample_sd import build_pipeline
    from pipeline.models.loading import load_generator_models

    pipe = build_pipeline(load_generator_models(cfg), "ddim")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ids = pipe.tokenizer(["a red car"], padding="max_length", max_length=77, return_tensors="pt").input_ids

    def outputs():
        with torch.no_grad():
            cond = pipe.text_encoder(ids)[0]
            return pipe.unet(x, torch.tensor([500]), cond).sample, cond

    unet0, text0 = outputs()
    pipe.load_lora_weights(str(folder))
    unet1, text1 = outputs()
    assert not torch.allclose(unet1, unet0, atol=1e-6)
    assert not torch.allclose(text1, text0, atol=1e-7)
    pipe.unload_lora_weights()
    unet2, text2 = outputs()
    assert torch.equal(unet2, unet0) and torch.equal(text2, text0)
