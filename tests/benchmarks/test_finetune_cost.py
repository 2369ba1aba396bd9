"""benchmarks/finetune_cost.py at real size on the meta device: the LoRA it counts, the step FLOPs and memory."""

from __future__ import annotations

import torch

from benchmarks.finetune_cost import build, count
from pipeline.config_loading import load_config, preset_path


def _independent_lora_params(base: str) -> int:
    """r x (in + out) for every targeted Linear of freshly built models (no peft involved)."""
    _, unet, te = build(base, "meta")
    total = 0
    targets = ((unet, ("to_q", "to_k", "to_v", "to_out.0")), (te, ("q_proj", "k_proj", "v_proj", "out_proj")))
    for module, names in targets:
        for name, m in module.named_modules():
            if isinstance(m, torch.nn.Linear) and name.endswith(names):
                total += 4 * (m.in_features + m.out_features)
    return total


def test_sd15_step_counts_and_memory() -> None:
    cfg = load_config(preset_path("gors"), ["finetune.gradient_checkpointing=true"])
    r = count(cfg, "sd15", batch=1)
    assert r["lora_params"] == _independent_lora_params("sd15")
    assert r["floor_s_tf32"] == 2 * r["floor_s_bf16"] and r["step_flops"] > 1e12
    m = r["memory"]
    assert m["activations_checkpointed_gib"] < m["activations_no_checkpointing_gib"]
    assert m["weights_gib"] > 3.5 and m["fits_24gb"]  # fp32 SD 1.5: ~1.07 B parameters
