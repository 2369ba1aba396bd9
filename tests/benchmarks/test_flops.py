"""benchmarks/flops.py at the real model sizes (meta device): the CLI, the totals, an analytic check."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _flops_json(preset: str) -> dict:
    proc = subprocess.run([sys.executable, "benchmarks/flops.py", "--config", f"configs/{preset}.yaml", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def paper_flops() -> dict:
    return _flops_json("paper")


def test_json_has_the_total_and_every_component(paper_flops) -> None:
    comps = paper_flops["components"]
    for name in ("referee_vit_fwd_bwd", "qformer_itm_fwd_bwd", "qformer_caption_fwd_bwd", "vae_decoder_fwd_bwd",
                 "unet_cfg_fwd", "vqa_vision_fwd", "vqa_question_fwd"):
        assert comps[name]["flops_per_call"] > 0, name
    assert paper_flops["total_flops"] == sum(c["flops_per_image"] for c in comps.values())
    # The paper's multiplicities: 150 iterations x 30 views, 150 decodes, 160 CFG UNet passes.
    assert comps["referee_vit_fwd_bwd"]["calls_per_image"] == 150 * 30
    assert comps["vae_decoder_fwd_bwd"]["calls_per_image"] == 150
    assert comps["unet_cfg_fwd"]["calls_per_image"] == 160
    # DESIGN.md section 6: the ViT dominates.
    assert paper_flops["groups"]["referee_vit"]["share"] > 0.7
    assert paper_flops["floor_seconds_per_image"] == pytest.approx(paper_flops["total_flops"] / 989e12)


def test_vit_count_agrees_with_two_params_tokens(paper_flops) -> None:
    """Independent estimate: forward = 2 x params x tokens + attention (QK^T and AV: 4 L^2 d per layer);
    backward with frozen weights = input gradients only: 1x the weight matmuls, 2x attention."""
    params = paper_flops["parameters"]["referee_vit"]  # ViT-g/14 without its last layer: ~0.99 B
    tokens, d, layers = (224 // 14) ** 2 + 1, 1408, 39
    attention = 4 * tokens**2 * d * layers
    fwd_bwd = 2 * (2 * params * tokens) + 3 * attention
    counted = paper_flops["components"]["referee_vit_fwd_bwd"]["flops_per_call"]
    assert counted == pytest.approx(fwd_bwd, rel=0.10)
    assert paper_flops["analytic_check"]["ratio"] == pytest.approx(1.0, rel=0.10)
    assert 0.9e9 < params < 1.1e9


def test_top_k_adds_the_selection_pass() -> None:
    from benchmarks.flops import Assumptions, calls_per_image
    from pipeline.config_loading import load_config, preset_path

    cfg = load_config(preset_path("vlminv"), ["augment.top_k=5"])  # 10 views, the 5 hardest kept
    calls = calls_per_image(cfg, Assumptions())
    assert calls["referee_vit_fwd_bwd"] == 150 * 5
    assert calls["referee_vit_fwd"] == 150 * 10 + 1
    # The vlminv preset itself keeps all 10 views (the code's aug_topk = cutn): no selection pass.
    calls = calls_per_image(load_config(preset_path("vlminv")), Assumptions())
    assert calls["referee_vit_fwd_bwd"] == 150 * 10 and calls["referee_vit_fwd"] == 1


def test_plan_floor_constants_are_the_counters(paper_flops) -> None:
    """``--plan`` reads per-pass FLOPs from pipeline/engine/flop_floor.py (no torch): they must be the counter's."""
    from pipeline.config_loading import load_config, preset_path
    from pipeline.engine.flop_floor import REAL_FLOPS_PER_CALL, floor_per_image

    assert REAL_FLOPS_PER_CALL == {k: c["flops_per_call"] for k, c in paper_flops["components"].items()}
    floor = floor_per_image(load_config(preset_path("paper")), 989.0, 1.0)
    assert floor["flops_per_image"] == paper_flops["total_flops"]


@pytest.fixture(scope="module")
def sd15_flops() -> dict:
    return _flops_json("sd15")


def test_sampling_path_counts_steps_one_decode_and_the_text_encoder(sd15_flops, paper_flops) -> None:
    comps = sd15_flops["components"]
    calls = {name: c["calls_per_image"] for name, c in comps.items() if c["calls_per_image"]}
    # 30 guided DDIM steps (T2I-CompBench's sampling), prompt + empty negative prompt, one decode, scoring.
    assert calls == {"unet_cfg_fwd": 30, "clip_text_fwd": 2, "vae_decoder_fwd": 1, "vqa_vision_fwd": 1,
                     "vqa_question_fwd": 2}
    assert sd15_flops["total_flops"] == sum(c["flops_per_image"] for c in comps.values())
    assert sd15_flops["groups"]["unet"]["share"] > 0.9
    # The UNet's FLOPs are linear in the batch: the guided pass is two unguided ones.
    assert comps["unet_cfg_fwd"]["flops_per_call"] == 2 * comps["unet_fwd"]["flops_per_call"]
    # The estimate: ~1.6 TFLOP per guided step plus a decode, against ~6 PFLOP per inverted image.
    assert 1.5e12 < comps["unet_cfg_fwd"]["flops_per_call"] < 1.7e12
    assert 0.04e15 < sd15_flops["total_flops"] < 0.06e15 and 5.5e15 < paper_flops["total_flops"] < 6.5e15


def test_plan_floor_counts_the_sampling_path_as_the_counter_does(sd15_flops) -> None:
    from pipeline.config_loading import load_config, preset_path
    from pipeline.engine.flop_floor import Assumptions, calls_per_image, floor_per_image

    floor = floor_per_image(load_config(preset_path("sd15")), 989.0, 1.0)
    assert floor["flops_per_image"] == sd15_flops["total_flops"]
    assert floor["floor_seconds_per_image"] == pytest.approx(sd15_flops["floor_seconds_per_image"])
    unguided = calls_per_image(load_config(preset_path("sd15"), ["sampling.guidance_scale=1.0"]), Assumptions())
    assert (unguided["unet_fwd"], unguided["unet_cfg_fwd"], unguided["clip_text_fwd"]) == (30, 0, 1)
    fifty = calls_per_image(load_config(preset_path("sd15"), ["sampling.steps=50"]), Assumptions())
    assert fifty["unet_cfg_fwd"] == 50
