"""The finetune config section, GORS's presets, the exactness record, and sampling.lora in the config hash."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError
from pipeline.config_loading import load_config, preset_path
from pipeline.finetune.record import GORS_BASE, objective_record
from pipeline.models.lora_files import resolve_lora


def _gors(*extra: str, sd2: bool = False):
    paths = [preset_path("gors")] + ([preset_path("gors-sd2")] if sd2 else [])
    return load_config(paths, list(extra))


def test_gors_preset_holds_the_shipped_scripts_numbers() -> None:
    f = _gors().finetune
    assert (f.rank, f.alpha, f.init, f.train_text_encoder) == (4, 4.0, "gaussian", True)
    assert f.unet_targets == ["to_q", "to_k", "to_v", "to_out.0"]
    assert f.text_targets == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert (f.lr_unet, f.lr_text, f.betas, f.weight_decay, f.eps) == (1e-4, 5e-6, [0.9, 0.999], 1e-2, 1e-8)
    assert (f.max_grad_norm, f.lr_schedule, f.resolution, f.batch_size) == (1.0, "constant", 512, 2)
    assert (f.mixed_precision, f.max_steps, f.seed) == ("no", 15000, 42)
    assert f.base_model == "" and _gors(sd2=True).finetune.base_model == GORS_BASE


def test_the_record_names_only_what_differs() -> None:
    sd2 = objective_record(_gors(sd2=True).finetune, GORS_BASE, world_size=8)
    points = [d["point"] for d in sd2["deviations"]]
    assert "base model" not in points and "global batch" not in points
    assert not any(p.startswith(("LoRA rank", "UNet learning rate", "precision (")) for p in points)
    assert {"per-process randomness", "precision", "prompt list", "inference with the LoRA"} <= set(points)
    ours = objective_record(_gors("finetune.lr_unet=0.0002").finetune, "sd15@main", world_size=1)
    by_point = {d["point"]: d for d in ours["deviations"]}
    assert by_point["UNet learning rate"]["ours"] == 2e-4 and by_point["UNet learning rate"]["gors"] == 1e-4
    assert by_point["base model"]["ours"] == "sd15@main" and "global batch" in by_point


def test_finetune_settings_leave_the_synthesis_hash_alone() -> None:
    assert _gors("finetune.max_steps=10", "finetune.rank=8").hash() == _gors().hash()


def test_sampling_lora_is_hashed_by_its_weights_and_needs_sd_sampling(tmp_path) -> None:
    with pytest.raises(ConfigError, match="sd_sampling"):
        load_config(overrides=[f"sampling.lora={tmp_path}"])
    for name, data in (("a", b"one"), ("b", b"one"), ("c", b"two")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "pytorch_lora_weights.safetensors").write_bytes(data)

    def h(lora: str) -> str:
        sets = ["engine.generator=sd_sampling"] + ([f"sampling.lora={lora}"] if lora else [])
        return resolve_lora(load_config(overrides=sets)).hash()

    assert h(str(tmp_path / "a")) == h(str(tmp_path / "b")) != h(str(tmp_path / "c"))
    assert h("") not in (h(str(tmp_path / "a")), h(str(tmp_path / "c")))
    with pytest.raises(ConfigError, match="no pytorch_lora_weights"):
        h(str(tmp_path))
