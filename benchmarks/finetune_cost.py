"""The finetune's cost at real size: FLOPs and floor of one training step, peak memory at batch 1 with
gradient checkpointing, and (``--measure``) samples/s and peak memory measured on this machine's device.

    python benchmarks/finetune_cost.py [--base sd15|sd2] [--batch 1] [--config configs/gors.yaml] [--json]
    python benchmarks/finetune_cost.py --measure --steps 5 [--batch 2]   # random weights, real size, on a GPU

Counted on the meta device (nothing allocated), as benchmarks/flops.py counts the engine: one step is the VAE
encoder forward (no grad), the text encoder forward and backward (LoRA on q/k/v/out), the UNet forward and
backward (LoRA on to_q/k/v/out.0; frozen weights: input gradients plus the LoRA weight gradients). The floor
is FLOPs / --tflops (989: the H100's dense BF16 peak; the paper preset trains in fp32, whose TF32 tensor-core
peak is half that, so the fp32 floor is printed too).

Peak memory is computed, not guessed: parameters (fp32) + LoRA parameters, gradients and AdamW's two moments
+ the activations autograd keeps, found by hooking ``saved_tensors_hooks`` during a meta forward. With
diffusers' gradient checkpointing every ResnetBlock2D and Transformer2DModel keeps only its input; during
the backward one of them is recomputed at a time. So: activations = saved outside those modules + their
inputs + the largest one module saves + the largest activation twice (its gradient in flight). A CUDA
context and allocator slack come on top (about 0.5-1 GB on an H100 with torch 2.x).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from benchmarks.real_models import clip_text_config, unet_kwargs, vae_kwargs  # noqa: E402
from jobs.cli import run_main  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.config_loading import load_config, preset_path  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0
H100_TF32_DENSE_TFLOPS = 494.5
GIB = 1024**3


def build(base: str, device: str | torch.device) -> tuple[Any, Any, Any]:
    """VAE, UNet, text encoder at real size (SD 1.5, or SD2-base's 1024-wide text encoder and attention)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from pipeline.models.quiet import quiet_library_logs

    quiet_library_logs()
    ukw, tcfg = unet_kwargs(), clip_text_config()
    if base == "sd2":  # stabilityai/stable-diffusion-2-base's configs
        ukw.update(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
        tcfg.hidden_size, tcfg.intermediate_size, tcfg.num_attention_heads = 1024, 4096, 16
        tcfg.num_hidden_layers, tcfg.projection_dim, tcfg.hidden_act = 23, 512, "gelu"
    with torch.device(device):
        vae, unet, te = AutoencoderKL(**vae_kwargs()), UNet2DConditionModel(**ukw), CLIPTextModel(tcfg)
    for m in (vae, unet, te):
        m.requires_grad_(False)
    return vae, unet, te


def _step(vae: Any, unet: Any, te: Any, batch: int, device: Any, loss_only: bool = False) -> torch.Tensor:
    """One training step's passes (the loss of pipeline/finetune/loss.py without the scheduler arithmetic)."""
    with torch.no_grad():
        z = vae.encode(torch.zeros(batch, 3, 512, 512, device=device)).latent_dist.mean
    cond = te(torch.zeros(batch, 77, dtype=torch.long, device=device))[0]
    pred = unet(z, torch.zeros(batch, dtype=torch.long, device=device), cond).sample
    loss = pred.float().pow(2).mean()
    if not loss_only:
        loss.backward()
    return loss


def _with_lora(cfg: Config, base: str, device: Any, checkpointing: bool) -> tuple[Any, Any, Any, int]:
    from pipeline.finetune.lora import add_lora, trainable

    vae, unet, te = build(base, device)
    add_lora(unet, te, cfg.finetune)
    if checkpointing:
        unet.enable_gradient_checkpointing()
        te.gradient_checkpointing_enable()
    unet.train()
    te.train()
    lora = sum(p.numel() for p in trainable(unet) + trainable(te))
    return vae, unet, te, lora


def count(cfg: Config, base: str, batch: int) -> dict[str, Any]:
    vae, unet, te, lora = _with_lora(cfg, base, "meta", checkpointing=False)
    with FlopCounterMode(display=False) as counter:
        _step(vae, unet, te, batch, "meta")
    flops = int(counter.get_total_flops())
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in (("vae", vae), ("unet", unet), ("te", te))}
    return {"base": base, "batch": batch, "step_flops": flops, "lora_params": lora,
            "frozen_params": {k: v - (lora if k == "unet" else 0) for k, v in params.items()},
            "floor_s_bf16": flops / (H100_BF16_DENSE_TFLOPS * 1e12),
            "floor_s_tf32": flops / (H100_TF32_DENSE_TFLOPS * 1e12),
            "memory": memory(cfg, base, batch, params, lora)}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def memory(cfg: Config, base: str, batch: int, params: dict[str, int], lora: int) -> dict[str, Any]:
    """Computed peak bytes of a step at ``batch`` with gradient checkpointing, fp32 weights (the paper preset)."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    vae, unet, te, _ = _with_lora(cfg, base, "meta", checkpointing=False)
    seen: dict[int, torch.Tensor] = {}
    inside: list[int] = []  # bytes saved inside the checkpointed module now running (stack)
    per_module: list[int] = []
    inputs: list[int] = []
    largest = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = id(t._base if t._base is not None else t)
        if key not in seen:
            seen[key] = t
            largest[0] = max(largest[0], _nbytes(t))
            if inside:
                inside[-1] += _nbytes(t)
        return t

    def pre(module: Any, args: Any) -> None:
        inside.append(0)
        inputs.append(sum(_nbytes(a) for a in args if isinstance(a, torch.Tensor)))

    def post(module: Any, args: Any, out: Any) -> None:
        per_module.append(inside.pop())

    blocks = [m for m in unet.modules() if isinstance(m, (ResnetBlock2D, Transformer2DModel))]
    hooks = [m.register_forward_pre_hook(pre) for m in blocks] + [m.register_forward_hook(post) for m in blocks]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _step(vae, unet, te, batch, "meta", loss_only=True)
    for h in hooks:
        h.remove()
    total_saved = sum(_nbytes(t) for t in seen.values())
    outside = total_saved - sum(per_module)
    plain = total_saved + 2 * largest[0]
    # checkpointing never keeps more than the plain graph; the formula's inputs may already be saved tensors
    activations_ckpt = min(outside + sum(inputs) + max(per_module) + 2 * largest[0], plain)
    weights = 4 * sum(params.values())
    lora_state = 4 * lora * 4  # fp32 weights, gradients, AdamW exp_avg and exp_avg_sq
    peak = weights + lora_state + activations_ckpt
    return {
        "weights_gib": weights / GIB, "lora_state_gib": lora_state / GIB,
        "activations_no_checkpointing_gib": plain / GIB,
        "activations_checkpointed_gib": activations_ckpt / GIB,
        "peak_gib": peak / GIB, "fits_24gb": peak / GIB < 24 - 1.0,  # leave 1 GiB for context and slack
    }


def measure(cfg: Config, base: str, batch: int, steps: int, device: str) -> dict[str, Any]:
    """Real-size random-weight steps on ``device``: samples/s and the allocator's peak (CUDA)."""
    dev = torch.device(device)
    vae, unet, te, _ = _with_lora(cfg, base, dev, checkpointing=cfg.finetune.gradient_checkpointing)
    from pipeline.finetune.lora import trainable

    opt = torch.optim.AdamW(trainable(unet) + trainable(te), lr=1e-4)
    sync: Callable[[], None] = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    _step(vae, unet, te, batch, dev)
    opt.step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        _step(vae, unet, te, batch, dev)
        opt.step()
    sync()
    seconds = (time.perf_counter() - t0) / steps
    out = {"device": str(dev), "batch": batch, "seconds_per_step": seconds, "samples_per_s": batch / seconds,
           "gradient_checkpointing": cfg.finetune.gradient_checkpointing}
    if dev.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
        out["device_name"] = torch.cuda.get_device_name()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="finetune_cost.py", description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", help="default: configs/gors.yaml")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--base", choices=["sd15", "sd2"], default="sd15")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--measure", action="store_true", help="also run real-size steps on --device")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    cfg = load_config(args.config or [preset_path("gors")], ["finetune.gradient_checkpointing=true", *args.set])
    result = count(cfg, args.base, args.batch)
    if args.measure:
        result["measured"] = measure(cfg, args.base, args.batch, args.steps, args.device)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    m = result["memory"]
    print(f"base {args.base}, batch {args.batch}: one training step = {result['step_flops'] / 1e12:.3f} TFLOP; "
          f"floor on an H100 {result['floor_s_bf16'] * 1e3:.1f} ms (bf16 peak) / {result['floor_s_tf32'] * 1e3:.1f} ms "
          f"(tf32), i.e. at most {args.batch / result['floor_s_tf32']:.1f} samples/s in fp32")
    print(f"LoRA parameters {result['lora_params']:,}; peak memory with gradient checkpointing, fp32: "
          f"{m['peak_gib']:.2f} GiB (weights {m['weights_gib']:.2f}, LoRA + AdamW {m['lora_state_gib']:.3f}, "
          f"activations {m['activations_checkpointed_gib']:.2f}; without checkpointing "
          f"{m['activations_no_checkpointing_gib']:.2f}); fits a 24 GB GPU: {'yes' if m['fits_24gb'] else 'no'}")
    if "measured" in result:
        r = result["measured"]
        peak = f", peak {r['peak_gib']:.2f} GiB" if "peak_gib" in r else ""
        print(f"measured on {r.get('device_name', r['device'])}: {r['samples_per_s']:.2f} samples/s{peak}")
    return 0


if __name__ == "__main__":
    run_main(main)
