"""The BLIP VQA checkpoint converter: original layout -> transformers folder -> same model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config_loading import load_config, preset_path
from pipeline.errors import UserError
from pipeline.models.convert_blip_vqa import convert_blip_vqa, infer_config, rename_key
from pipeline.models.loading import load_vqa_models
from pipeline.scoring.vqa import VqaScorer
from tests.conftest import ROOT
from tests.pipeline.models.timm_names import TO_TIMM_VIT, rename_first

# transformers name -> original BLIP name, written independently of the converter's table.
_TO_ORIGINAL = [
    *TO_TIMM_VIT,
    (r"^vision_model\.post_layernorm\.", "visual_encoder.norm."),
]


def to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {rename_first(key, _TO_ORIGINAL): value.clone() for key, value in state.items()}
    # BLIP's med.py saves these buffers; the converter must drop them.
    max_pos = state["text_encoder.embeddings.position_embeddings.weight"].shape[0]
    out["text_encoder.embeddings.position_ids"] = torch.arange(max_pos)[None]
    out["text_decoder.bert.embeddings.position_ids"] = torch.arange(max_pos)[None]
    return out


@pytest.fixture(scope="module")
def original_checkpoint(vqa_models, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("blip-orig") / "model_base_vqa_capfilt_large.pth"
    torch.save({"model": to_original(vqa_models.model.state_dict())}, path)
    return path


def test_original_layout_has_blip_names(original_checkpoint):
    keys = torch.load(original_checkpoint, weights_only=True)["model"].keys()
    assert "visual_encoder.blocks.0.attn.qkv.weight" in keys and "visual_encoder.pos_embed" in keys
    assert not any(k.startswith("vision_model.") for k in keys)


def test_roundtrip_gives_the_same_model_and_scores(original_checkpoint, vqa_models, tiny_cfg, tmp_path):
    out = convert_blip_vqa(
        original_checkpoint, tmp_path / "vqa480", Path(vqa_models.source), base_config=vqa_models.source
    )
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not list(out.glob("*.bin"))
    cfg = load_config(preset_path("tiny"), ["models.tiny=false", f"models.vqa={out}", "models.device=cpu"])
    converted = load_vqa_models(cfg)
    assert converted.model.config.vision_config.image_size == 480
    ref, new = vqa_models.model.state_dict(), converted.model.state_dict()
    assert ref.keys() == new.keys()
    assert all(torch.equal(ref[k], new[k]) for k in ref)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(3)]
    prompts = ["a green bench and a blue bowl", "a book on the left of a bird", "a red car"]
    assert VqaScorer(converted, cfg).score(images, prompts) == VqaScorer(vqa_models, tiny_cfg).score(images, prompts)


def test_full_size_layout_is_inferred_as_blip_base(vqa_models):
    """BLIP ViT-B/16 at 480 + BERT-base shapes (on the meta device: no memory) -> BLIP's config."""
    from transformers import BlipConfig, BlipForQuestionAnswering

    base = BlipConfig(
        vision_config=dict(image_size=480, patch_size=16, hidden_size=768, intermediate_size=3072,
                           num_hidden_layers=12, num_attention_heads=12),
        text_config=dict(vocab_size=30524, hidden_size=768, encoder_hidden_size=768, intermediate_size=3072,
                         num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512),
    )
    with torch.device("meta"):
        state = BlipForQuestionAnswering(base).state_dict()
    original = {rename_first(key, _TO_ORIGINAL): value for key, value in state.items()}
    assert {rename_key(k) for k in original} == set(state)
    cfg = infer_config(original, vqa_models.tokenizer, Path("x.pth"))
    v, t = cfg.vision_config, cfg.text_config
    assert (v.image_size, v.patch_size, v.hidden_size, v.num_hidden_layers, v.num_attention_heads) == (
        480, 16, 768, 12, 12)
    assert v.intermediate_size == 3072 and v.layer_norm_eps == 1e-6
    assert (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.num_attention_heads) == (30524, 768, 12, 12)
    assert (t.max_position_embeddings, t.intermediate_size, t.layer_norm_eps) == (512, 3072, 1e-12)


def test_rejects_a_file_that_is_not_a_checkpoint(tmp_path, vqa_models):
    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(UserError, match="not a BLIP VQA checkpoint") as err:
        convert_blip_vqa(bad, tmp_path / "out", Path(vqa_models.source))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_rejects_a_checkpoint_with_other_keys(tmp_path, vqa_models, original_checkpoint):
    state = torch.load(original_checkpoint, weights_only=True)["model"]
    captioner = {k: v for k, v in state.items() if not k.startswith("text_encoder.")}  # BLIP captioning layout
    torch.save({"model": captioner}, tmp_path / "caption.pth")
    with pytest.raises(UserError, match="not a BLIP VQA checkpoint"):
        convert_blip_vqa(tmp_path / "caption.pth", tmp_path / "o1", Path(vqa_models.source),
                         base_config=vqa_models.source)
    extra = {**state, "itm_head.weight": torch.zeros(2, 32)}  # retrieval layout
    torch.save({"model": extra}, tmp_path / "itm.pth")
    with pytest.raises(UserError, match="unexpected, e.g. itm_head.weight"):
        convert_blip_vqa(tmp_path / "itm.pth", tmp_path / "o2", Path(vqa_models.source),
                         base_config=vqa_models.source)


def test_refuses_pickled_code(tmp_path, vqa_models):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "obj": object()}, path)
    with pytest.raises(UserError, match="weights-only"):
        convert_blip_vqa(path, tmp_path / "out", Path(vqa_models.source))


def test_refuses_a_non_empty_output(tmp_path, original_checkpoint, vqa_models):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        convert_blip_vqa(original_checkpoint, tmp_path / "out", Path(vqa_models.source),
                         base_config=vqa_models.source)


def test_cli_wrong_file_is_one_line_exit_2(tmp_path, vqa_models):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00\x01garbage")
    proc = subprocess.run(
        [sys.executable, "jobs/convert_checkpoints.py", "blip-vqa", "--checkpoint", str(bad),
         "--output", str(tmp_path / "out"), "--tokenizer", vqa_models.source],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stderr
