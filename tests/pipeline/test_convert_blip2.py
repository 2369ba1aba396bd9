"""LAVIS BLIP-2 stage-1 checkpoint -> referee folder: round trip through the tiny referee, rejections."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.convert_blip2 import convert_lavis_blip2
from pipeline.errors import UserError
from pipeline.models import load_generator_models, model_sources
from tests.conftest import ROOT
from tests.pipeline.timm_names import TO_TIMM_VIT, rename_first

# transformers name -> LAVIS name, written independently of the converter (its inverse).
_TO_LAVIS = [
    *TO_TIMM_VIT,
    (r"^vision_model\.post_layernorm\.", "ln_vision."),
    (r"^embeddings\.", "Qformer.bert.embeddings."),
    (r"^qformer\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
    (r"^qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.",
     r"Qformer.bert.encoder.layer.\1.\2.self."),
    (r"^qformer\.encoder\.", "Qformer.bert.encoder."),
    (r"^vision_projection\.", "vision_proj."),
    (r"^text_projection\.", "text_proj."),
]
_HEAD_TO_LAVIS = {
    "dense.weight": "Qformer.cls.predictions.transform.dense.weight",
    "dense.bias": "Qformer.cls.predictions.transform.dense.bias",
    "layer_norm.weight": "Qformer.cls.predictions.transform.LayerNorm.weight",
    "layer_norm.bias": "Qformer.cls.predictions.transform.LayerNorm.bias",
    "decoder.weight": "Qformer.cls.predictions.decoder.weight",
    "decoder.bias": "Qformer.cls.predictions.bias",
}


def _randomised(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Distinct random values everywhere, so a swapped or misplaced tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(v.shape, generator=g) for k, v in state.items()}
    for k in out:
        if k.endswith("self_attn.qkv.bias"):  # EVA has no key bias: (q_bias, 0, v_bias)
            third = out[k].shape[0] // 3
            out[k][third : 2 * third] = 0
    return out


def _to_lavis(referee: dict[str, torch.Tensor], head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {"temp": torch.tensor(0.07)}
    for key, value in referee.items():
        if m := re.match(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$", key):
            q, _, v = value.chunk(3)
            out[f"visual_encoder.blocks.{m.group(1)}.attn.q_bias"] = q
            out[f"visual_encoder.blocks.{m.group(1)}.attn.v_bias"] = v
            continue
        out[rename_first(key, _TO_LAVIS)] = value
    for key, value in head.items():
        out[_HEAD_TO_LAVIS[key]] = value
    out["Qformer.cls.predictions.decoder.bias"] = head["decoder.bias"]  # LAVIS's alias of `bias`
    return out


@pytest.fixture(scope="module")
def tiny_referee_dir(tiny_cfg) -> Path:
    return Path(model_sources(tiny_cfg.models)["referee"])


@pytest.fixture(scope="module")
def source(generator_models) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    referee = _randomised(generator_models.referee.state_dict(), 0)
    head = _randomised(generator_models.caption_head.state_dict(), 1)
    return referee, head


def _save(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "blip2_pretrained.pth") -> Path:
    path = tmp_path / name
    torch.save({"model": state}, path)
    return path


def _convert(ckpt: Path, out: Path, tiny_referee_dir: Path) -> Path:
    return convert_lavis_blip2(ckpt, out, tokenizer=tiny_referee_dir, base_config=tiny_referee_dir)


def test_round_trip_through_the_lavis_layout(tmp_path, source, tiny_referee_dir, tiny_cfg) -> None:
    from transformers import AutoTokenizer, Blip2ForImageTextRetrieval

    from pipeline.caption_head import Blip2CaptionHead

    referee, head = source
    lavis = _to_lavis(referee, head)
    assert any(k.endswith("attn.q_bias") for k in lavis)
    assert "Qformer.bert.encoder.layer.0.attention.self.query.weight" in lavis
    out = _convert(_save(tmp_path, lavis), tmp_path / "referee", tiny_referee_dir)
    assert (out / "model.safetensors").is_file() and (out / "caption_head" / "model.safetensors").is_file()
    loaded = Blip2ForImageTextRetrieval.from_pretrained(out).state_dict()
    assert loaded.keys() == referee.keys()
    for k, v in referee.items():
        assert torch.equal(loaded[k], v), k
    loaded_head = Blip2CaptionHead.from_pretrained(out, subfolder="caption_head").state_dict()
    assert all(torch.equal(loaded_head[k], v) for k, v in head.items())
    assert AutoTokenizer.from_pretrained(out).bos_token == "[DEC]"
    # The folder is what the loader reads as models.referee.
    sd = model_sources(tiny_cfg.models)["stable_diffusion"]
    cfg = load_config(overrides=[f"models.referee={out}", f"models.stable_diffusion={sd}", "models.device=cpu"])
    models = load_generator_models(cfg)
    assert torch.equal(models.referee.itm_head.weight, referee["itm_head.weight"])
    assert models.referee.config.qformer_config.use_qformer_text_input


def _rejects(tmp_path: Path, state: dict, tiny_referee_dir: Path, *words: str) -> str:
    with pytest.raises(UserError) as err:
        _convert(_save(tmp_path, state), tmp_path / "out", tiny_referee_dir)
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert not (tmp_path / "out").exists()
    return msg


def test_rejects_a_checkpoint_that_is_not_blip2(tmp_path, tiny_referee_dir) -> None:
    _rejects(tmp_path, {"encoder.weight": torch.zeros(2, 2)}, tiny_referee_dir, "not a LAVIS BLIP-2")


def test_rejects_missing_unexpected_and_misshaped_keys(tmp_path, source, tiny_referee_dir) -> None:
    lavis = _to_lavis(*source)
    missing = {k: v for k, v in lavis.items() if k != "itm_head.weight"}
    _rejects(tmp_path, missing, tiny_referee_dir, "missing", "itm_head.weight")
    extra = dict(lavis, **{"Qformer.bert.pooler.dense.weight": torch.zeros(2, 2)})
    _rejects(tmp_path, extra, tiny_referee_dir, "unexpected", "Qformer.bert.pooler.dense.weight")
    no_head = {k: v for k, v in lavis.items() if not k.startswith("Qformer.cls.predictions.transform.dense")}
    _rejects(tmp_path, no_head, tiny_referee_dir, "caption head", "dense")
    bad_shape = dict(lavis, **{"text_proj.weight": torch.zeros(3, 3)})
    _rejects(tmp_path, bad_shape, tiny_referee_dir, "text_projection.weight", "shape")


def test_rejects_unreadable_files_and_wrong_tokenizers(tmp_path, source, tiny_referee_dir, tiny_cfg) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(UserError, match="cannot be read"):
        _convert(text, tmp_path / "out", tiny_referee_dir)
    with pytest.raises(UserError, match="not found"):
        _convert(tmp_path / "missing.pth", tmp_path / "out", tiny_referee_dir)
    ckpt = _save(tmp_path, _to_lavis(*source))
    with pytest.raises(UserError, match="base_config"):  # tiny widths: heads cannot be guessed
        convert_lavis_blip2(ckpt, tmp_path / "out", tokenizer=tiny_referee_dir)
    clip_tok = Path(model_sources(tiny_cfg.models)["stable_diffusion"]) / "tokenizer"
    with pytest.raises(UserError, match="tokenizer has"):
        convert_lavis_blip2(ckpt, tmp_path / "out", tokenizer=clip_tok, base_config=tiny_referee_dir)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(UserError, match="not empty"):
        _convert(ckpt, tmp_path / "full", tiny_referee_dir)


def test_cli_reports_one_line_and_exit_2(tmp_path, tiny_referee_dir) -> None:
    bad = _save(tmp_path, {"encoder.weight": torch.zeros(2, 2)})
    proc = subprocess.run(
        [sys.executable, "jobs/convert_checkpoints.py", "blip2", "--lavis-checkpoint", str(bad),
         "--output", str(tmp_path / "out"), "--tokenizer", str(tiny_referee_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a LAVIS BLIP-2" in lines[0]
