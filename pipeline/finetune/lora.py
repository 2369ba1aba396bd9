"""LoRA adapters on the SD UNet and CLIP text encoder (peft), saved in the format diffusers loads.

GORS's cloneofsimo layers are W x + Up(Down(x)) with Down ~ N(0, 1/r), Up = 0 and scale 1; peft's
``gaussian`` init with ``lora_alpha == r`` is the same map (docs/FINETUNE.md). We save with
``StableDiffusionPipeline.save_lora_weights`` (``pytorch_lora_weights.safetensors`` plus the adapters' alpha
metadata), so ``pipe.load_lora_weights(DIR)`` on a fresh pipeline restores them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.config import FinetuneConfig
from pipeline.engine.rng import seeded_global_cpu_rng
from pipeline.models.lora_files import LORA_FILE

ADAPTER = "gors"


def lora_config(fcfg: FinetuneConfig, targets: list[str]) -> Any:
    from peft import LoraConfig

    # Dropout 0 in training (cloneofsimo's default is 0.1 only in its *loader*, a GORS inference defect).
    return LoraConfig(r=fcfg.rank, lora_alpha=fcfg.alpha, init_lora_weights=fcfg.init, target_modules=list(targets),
                      lora_dropout=0.0)


def add_lora(unet: torch.nn.Module, text_encoder: torch.nn.Module, fcfg: FinetuneConfig) -> None:
    """Freeze both models and add the trainable adapters, initialised from ``finetune.seed`` (the same on
    every rank: the replicas start equal)."""
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    with seeded_global_cpu_rng(fcfg.seed, "lora-init"):  # peft draws A from torch's global RNG
        unet.add_adapter(lora_config(fcfg, fcfg.unet_targets), adapter_name=ADAPTER)
        if fcfg.train_text_encoder:
            # peft directly: transformers 5.24's add_adapter asks for peft >= 0.22, a release the lock's
            # registry does not have; its load_adapter (what diffusers' loader calls) has no such check.
            from peft import inject_adapter_in_model

            inject_adapter_in_model(lora_config(fcfg, fcfg.text_targets), text_encoder, adapter_name=ADAPTER)
    for module in (unet, text_encoder):
        for p in module.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trainable LoRA weights stay fp32 whatever the base dtype


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def adapted_layers(module: torch.nn.Module) -> int:
    """How many Linear layers carry the adapter (GORS: 128 in the SD UNet, 92 in SD2's text encoder, 48 in SD 1.5's)."""
    from peft.tuners.lora import LoraLayer

    return sum(1 for m in module.modules() if isinstance(m, LoraLayer))


def lora_state(unet: torch.nn.Module, text_encoder: torch.nn.Module,
               train_text: bool) -> dict[str, dict[str, torch.Tensor]]:
    """The adapters' weights in diffusers' key format, per model, on the CPU."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    out = {"unet": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER))}
    if train_text:
        out["text_encoder"] = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(text_encoder, adapter_name=ADAPTER))
    return {k: {n: t.detach().cpu().contiguous() for n, t in sd.items()} for k, sd in out.items()}


def save_lora(folder: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module, fcfg: FinetuneConfig) -> Path:
    """``folder/pytorch_lora_weights.safetensors``: what ``pipe.load_lora_weights(folder)`` reads."""
    from diffusers import StableDiffusionPipeline

    state = lora_state(unet, text_encoder, fcfg.train_text_encoder)
    meta = {"r": fcfg.rank, "lora_alpha": fcfg.alpha, "target_modules": list(fcfg.unet_targets)}
    text_meta = {"r": fcfg.rank, "lora_alpha": fcfg.alpha, "target_modules": list(fcfg.text_targets)}
    StableDiffusionPipeline.save_lora_weights(
        str(folder), unet_lora_layers=state["unet"], text_encoder_lora_layers=state.get("text_encoder"),
        safe_serialization=True, unet_lora_adapter_metadata=meta,
        text_encoder_lora_adapter_metadata=text_meta if fcfg.train_text_encoder else None,
    )
    return Path(folder) / LORA_FILE


def load_into(unet: torch.nn.Module, text_encoder: torch.nn.Module, state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Put saved adapter weights (``lora_state``'s format) back into models that have the adapters (resume)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    _strict_set(unet, convert_unet_state_dict_to_peft(state["unet"]), set_peft_model_state_dict)
    if "text_encoder" in state:
        from diffusers.utils.state_dict_utils import convert_state_dict_to_peft

        _strict_set(text_encoder, convert_state_dict_to_peft(state["text_encoder"]), set_peft_model_state_dict)


def _strict_set(module: torch.nn.Module, peft_state: dict[str, torch.Tensor], setter: Any) -> None:
    result = setter(module, peft_state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"checkpoint LoRA keys do not fit the model: {unexpected[:3]}")
