from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from pipeline.models.loading import frozen_modules, load_generator_models, model_sources
from pipeline.models.tiny import build_tiny_models, tiny_root
from tests.conftest import ROOT


def test_tiny_set_builds_and_reloads_from_cache(tiny_cfg, generator_models, vqa_models) -> None:
    root = tiny_root(tiny_cfg.models.tiny_cache_dir, tiny_cfg.models.tiny_seed)
    assert (root / "DONE").is_file()
    for sub in ("sd/vae", "sd/unet", "sd/text_encoder", "sd/tokenizer", "sd/scheduler", "referee/caption_head", "vqa"):
        assert (root / sub).is_dir(), sub
    # The loader read real from_pretrained folders: every source is inside the cache.
    assert all(Path(p).is_relative_to(root) for p in generator_models.sources.values())
    assert type(generator_models.referee).__name__ == "Blip2ForImageTextRetrieval"
    assert type(vqa_models.model).__name__ == "BlipForQuestionAnswering"
    # A second build is a no-op that returns the same folder with the same weights.
    mtime = (root / "DONE").stat().st_mtime
    assert build_tiny_models(tiny_cfg.models.tiny_cache_dir, tiny_cfg.models.tiny_seed) == root
    assert (root / "DONE").stat().st_mtime == mtime


def test_every_loaded_weight_is_frozen(generator_models, vqa_models) -> None:
    mods = frozen_modules(generator_models, vqa_models)
    assert len(mods) == 6
    for mod in mods:
        assert not mod.training
        assert all(not p.requires_grad for p in mod.parameters())


def test_tokenizers_are_real_and_carry_blip_specials(generator_models, vqa_models) -> None:
    ref = generator_models.referee_tokenizer
    assert ref.bos_token == "[DEC]"
    ids = ref("a red car").input_ids
    assert ids[0] == ref.cls_token_id and ids[-1] == ref.sep_token_id and len(ids) > 3
    assert vqa_models.tokenizer.convert_tokens_to_ids("[ENC]") != vqa_models.tokenizer.unk_token_id
    clip = generator_models.clip_tokenizer
    assert clip("the dog", padding="max_length", max_length=77, truncation=True).input_ids[0] == clip.bos_token_id


def test_same_seed_builds_identical_weights(tmp_path, tiny_cfg) -> None:
    other = build_tiny_models(tmp_path, tiny_cfg.models.tiny_seed)
    from safetensors.torch import load_file

    mine = tiny_root(tiny_cfg.models.tiny_cache_dir, tiny_cfg.models.tiny_seed)
    a = load_file(mine / "referee" / "model.safetensors")
    b = load_file(other / "referee" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_concurrent_builds_do_not_corrupt(tmp_path) -> None:
    code = "import sys; from pipeline.models.tiny import build_tiny_models; print(build_tiny_models(sys.argv[1], 3))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1]
    # Only the final folder remains; no half-built temp folders are left behind.
    assert [p.name for p in tmp_path.iterdir()] == [Path(outs[0]).name]
    from pipeline.config_loading import load_config

    cfg = load_config(overrides=["models.tiny=true", f"models.tiny_cache_dir={tmp_path}", "models.tiny_seed=3"])
    assert load_generator_models(cfg).vae is not None


def test_tiny_sources_point_into_cache(tiny_cfg) -> None:
    src = model_sources(tiny_cfg.models)
    assert set(src) == {"stable_diffusion", "referee", "vqa", "clip", "detector"}
    root = build_tiny_models(tiny_cfg.models.tiny_cache_dir or None, tiny_cfg.models.tiny_seed)
    assert all(Path(p).parent == root and Path(p).is_dir() for p in src.values())


def test_zoo_models_load_frozen_from_the_tiny_set(tiny_cfg) -> None:
    from transformers import CLIPModel, Owlv2ForObjectDetection

    from pipeline.models.loading import load_clip, load_detector

    clip = load_clip(tiny_cfg.models, "openai/clip-vit-large-patch14")
    det = load_detector(tiny_cfg.models, "google/owlv2-base-patch16-ensemble")
    assert isinstance(clip.model, CLIPModel) and isinstance(det.model, Owlv2ForObjectDetection)
    assert clip.source == model_sources(tiny_cfg.models)["clip"]
    for zoo in (clip, det):
        assert not zoo.model.training and not any(p.requires_grad for p in zoo.model.parameters())
    pixels = torch.rand(1, 3, 64, 64)
    ids = det.tokenizer(["a dog", "a cat"], padding="max_length", max_length=16, return_tensors="pt")
    out = det.model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=pixels)
    assert out.pred_boxes.shape == (1, 16, 4) and out.logits.shape == (1, 16, 2)


def test_zoo_source_is_the_id_without_the_tiny_set() -> None:
    from pipeline.config_loading import load_config
    from pipeline.models.loading import zoo_source

    cfg = load_config()
    assert zoo_source(cfg.models, "openai/clip-vit-base-patch32", "clip") == "openai/clip-vit-base-patch32"
    assert zoo_source(cfg.models, "~/models/owl", "detector") == str(Path.home() / "models" / "owl")


def _load_missing(kind: str, value: str) -> subprocess.CompletedProcess:
    code = (
        "import sys; from jobs.cli import run_main; from pipeline.config_loading import load_config\n"
        "from pipeline.models.loading import load_generator_models, load_vqa_models\n"
        f"cfg = load_config(overrides=['models.{kind}={value}', 'models.device=cpu'])\n"
        f"run_main(lambda argv: (load_vqa_models if '{kind}' == 'vqa' else load_generator_models)(cfg) and 0)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(Path(value).parent / "hf-home"))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)


def test_missing_hub_model_is_one_line(tmp_path) -> None:
    proc = _load_missing("vqa", "Salesforce/blip-vqa-capfilt-large")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Salesforce/blip-vqa-capfilt-large" in lines[0]
    assert "HF_HUB_OFFLINE" in lines[0] and "HF_HOME" in lines[0] and "models.vqa" in lines[0]


def test_missing_local_folder_is_one_line(tmp_path) -> None:
    proc = _load_missing("stable_diffusion", str(tmp_path / "no-such-sd"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "SD VAE" in lines[0] and "models.stable_diffusion" in lines[0], proc.stderr
