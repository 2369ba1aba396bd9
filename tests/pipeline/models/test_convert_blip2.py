"""LAVIS BLIP-2 stage-1 checkpoint -> referee folder: round trip through the tiny referee, rejections.

Two layouts: the released pair (``blip2_pretrained.pth`` without ``visual_encoder.*`` + a bare-named
``eva_vit_g.pth`` with one block more than LAVIS uses) and one merged file holding the ViT."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config_loading import load_config
from pipeline.errors import UserError
from pipeline.models.convert_blip2 import convert_lavis_blip2
from pipeline.models.loading import load_generator_models, model_sources
from tests.conftest import ROOT
from tests.pipeline.models.timm_names import TO_TIMM_VIT, rename_first

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


def _convert(ckpt: Path, out: Path, tiny_referee_dir: Path, vision: Path | None = None) -> Path:
    return convert_lavis_blip2(
        ckpt, out, tokenizer=tiny_referee_dir, vision_checkpoint=vision, base_config=tiny_referee_dir
    )


def _released_pair(lavis: dict[str, torch.Tensor], extra_block_seed: int = 2) -> tuple[dict, dict]:
    """(trainable-only state, bare-named ViT file state with one extra block, fp16 as the real file, and
    EVA-CLIP's final norm, which LAVIS does not use)."""
    trainable = {k: v for k, v in lavis.items() if not k.startswith("visual_encoder.")}
    vit = {k.removeprefix("visual_encoder."): v.half() for k, v in lavis.items() if k.startswith("visual_encoder.")}
    depth = 1 + max(int(k.split(".")[1]) for k in vit if k.startswith("blocks."))
    g = torch.Generator().manual_seed(extra_block_seed)
    for key in [k for k in vit if k.startswith("blocks.0.")]:
        vit[key.replace("blocks.0.", f"blocks.{depth}.", 1)] = torch.randn(vit[key].shape, generator=g).half()
    width = vit["cls_token"].shape[-1]
    vit["norm.weight"], vit["norm.bias"] = torch.ones(width).half(), torch.zeros(width).half()
    return trainable, vit


def _save_bare(tmp_path: Path, state: dict[str, torch.Tensor], name: str) -> Path:
    path = tmp_path / name
    torch.save(state, path)  # eva_vit_g.pth is a bare state dict, no {"model": ...}
    return path


def test_round_trip_through_the_lavis_layout(tmp_path, source, tiny_referee_dir, tiny_cfg) -> None:
    from transformers import AutoTokenizer, Blip2ForImageTextRetrieval

    from pipeline.models.caption_head import Blip2CaptionHead

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


def test_released_pair_converts_and_uses_all_but_the_last_vit_block(tmp_path, source, tiny_referee_dir,
                                                                    tiny_cfg) -> None:
    from transformers import Blip2ForImageTextRetrieval

    referee, head = source
    trainable, vit = _released_pair(_to_lavis(referee, head))
    # Formats are told apart by their keys: unusual names on purpose.
    ckpt = _save(tmp_path, trainable, "stage1.bin")
    vision = _save_bare(tmp_path, vit, "vit.weights")
    out = _convert(ckpt, tmp_path / "referee", tiny_referee_dir, vision)
    loaded = Blip2ForImageTextRetrieval.from_pretrained(out).state_dict()
    assert loaded.keys() == referee.keys()  # the extra block and EVA-CLIP's norm are not in it
    for k, v in referee.items():
        expected = v.half().float() if k.startswith("vision_model.") and "post_layernorm" not in k else v
        assert torch.equal(loaded[k], expected), k
    sd = model_sources(tiny_cfg.models)["stable_diffusion"]
    cfg = load_config(overrides=[f"models.referee={out}", f"models.stable_diffusion={sd}", "models.device=cpu"])
    vision_model = load_generator_models(cfg).referee.vision_model
    assert vision_model.post_layernorm.eps == 1e-5  # LAVIS's ln_vision, not the blocks' eps
    assert vision_model.encoder.layers[0].layer_norm1.eps != 1e-5


def test_released_file_without_vit_names_the_missing_file(tmp_path, source, tiny_referee_dir) -> None:
    trainable, _ = _released_pair(_to_lavis(*source))
    ckpt = _save(tmp_path, trainable)
    with pytest.raises(UserError) as err:
        _convert(ckpt, tmp_path / "out", tiny_referee_dir)
    assert str(err.value) == "blip2_pretrained.pth has no ViT weights: pass --vision-checkpoint eva_vit_g.pth"
    proc = _cli(tmp_path, "--lavis-checkpoint", str(ckpt), "--tokenizer", str(tiny_referee_dir))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: blip2_pretrained.pth has no ViT weights: pass --vision-checkpoint eva_vit_g.pth"
    )
    assert not (tmp_path / "out").exists()


def test_merged_file_with_all_40_eva_blocks_is_refused(tmp_path, source, tiny_referee_dir) -> None:
    lavis = _to_lavis(*source)
    block0 = {k: v for k, v in lavis.items() if k.startswith("visual_encoder.blocks.0.")}
    merged = {k: v for k, v in lavis.items() if not k.startswith("visual_encoder.blocks.")}
    for i in range(40):
        merged.update({k.replace("blocks.0.", f"blocks.{i}.", 1): v for k, v in block0.items()})
    msg = _rejects(tmp_path, merged, tiny_referee_dir, "40 blocks", "LAVIS", "uses 39")
    assert "--vision-checkpoint" in msg


def test_vision_checkpoint_rejections(tmp_path, source, tiny_referee_dir) -> None:
    lavis = _to_lavis(*source)
    trainable, vit = _released_pair(lavis)
    ckpt = _save(tmp_path, trainable)
    merged = _save(tmp_path, lavis, "merged.pth")
    vision = _save_bare(tmp_path, vit, "eva_vit_g.pth")
    cases = [
        (merged, vision, "already holds visual_encoder"),  # two ViTs: which one is meant?
        (ckpt, merged, "pass it as --lavis-checkpoint"),  # the files swapped
        (vision, ckpt, "bare ViT; pass that file as --vision-checkpoint"),
        (ckpt, _save_bare(tmp_path, {"weight": torch.zeros(2)}, "other.pth"), "not an EVA ViT"),
        (ckpt, _save_bare(tmp_path, {k: v for k, v in vit.items() if not k.startswith("blocks.1.")},
                          "gap.pth"), "missing"),
    ]
    for blip2, vit_file, words in cases:
        with pytest.raises(UserError, match=words) as err:
            _convert(blip2, tmp_path / "out", tiny_referee_dir, vit_file)
        assert "\n" not in str(err.value)
        assert not (tmp_path / "out").exists()
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "obj": _Opaque()}, pickled)
    with pytest.raises(UserError, match="weights-only"):
        _convert(ckpt, tmp_path / "out", tiny_referee_dir, pickled)


class _Opaque:
    """Not a tensor: torch.load(weights_only=True) refuses to unpickle it."""


def test_eva_g_file_must_have_its_40_blocks(tmp_path, source, tiny_referee_dir) -> None:
    trainable, _ = _released_pair(_to_lavis(*source))
    ckpt = _save(tmp_path, trainable)
    # Shapes of the real EVA ViT-g, cut down to what the block count check reads (39 blocks: pre-trimmed).
    vit = {"patch_embed.proj.weight": torch.zeros(1408, 3, 14, 14), "pos_embed": torch.zeros(1, 257, 1408)}
    vit.update({f"blocks.{i}.norm1.weight": torch.zeros(1) for i in range(39)})
    with pytest.raises(UserError, match="39 blocks; EVA ViT-g has 40, of which LAVIS uses the first 39"):
        _convert(ckpt, tmp_path / "out", tiny_referee_dir, _save_bare(tmp_path, vit, "eva_vit_g.pth"))


def test_cli_converts_the_released_pair(tmp_path, source, tiny_referee_dir) -> None:
    referee, head = source
    trainable, vit = _released_pair(_to_lavis(referee, head))
    ckpt, vision = _save(tmp_path, trainable), _save_bare(tmp_path, vit, "eva_vit_g.pth")
    # The tiny widths need the base config's head counts, which the CLI does not take: full-size
    # widths (88 / 64 per head) are covered by tests/parity.
    proc = _cli(tmp_path, "--lavis-checkpoint", str(ckpt), "--vision-checkpoint", str(vision),
                "--tokenizer", str(tiny_referee_dir))
    assert proc.returncode == 2 and "base_config" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "jobs/convert_checkpoints.py", "blip2", *args, "--output", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
