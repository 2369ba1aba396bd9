"""The full-size released key sets (tests/parity/data, listed from the original classes) map completely.

Meta tensors only: the checkpoints are written as the real files would be laid out (blip2_pretrained.pth
with the saved keys, eva_vit_g.pth with bare names and 40 blocks; BLIP's {"model": ...}) and go through
the converters' own readers and model builders on the meta device. The inferred configs are printed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.models import convert_blip2, convert_blip_vqa

pytestmark = pytest.mark.parity
DATA = Path(__file__).resolve().parent / "data"


def _keys(name: str) -> dict:
    return json.loads((DATA / name).read_text())


def _meta(shape: list[int], dtype: str) -> torch.Tensor:
    return torch.empty(shape, dtype=getattr(torch, dtype), device="meta")


def _released_blip2(tmp_path: Path) -> tuple[Path, Path]:
    keys = _keys("lavis_blip2_keys.json")["keys"]
    saved = {k: _meta(shape, dtype) for k, (shape, dtype, is_saved) in keys.items() if is_saved}
    vit = {k.removeprefix("visual_encoder."): _meta(shape, dtype)
           for k, (shape, dtype, _) in keys.items() if k.startswith("visual_encoder.")}
    # eva_vit_g.pth has a 40th block, which LAVIS does not build
    vit.update({k.replace("blocks.38.", "blocks.39.", 1): v for k, v in vit.items() if k.startswith("blocks.38.")})
    torch.save({"model": saved}, tmp_path / "blip2_pretrained.pth")
    torch.save(vit, tmp_path / "eva_vit_g.pth")
    return tmp_path / "blip2_pretrained.pth", tmp_path / "eva_vit_g.pth"


def test_full_size_blip2_pair_maps_completely(tmp_path: Path, note) -> None:
    data = _keys("lavis_blip2_keys.json")
    ckpt, vision = _released_blip2(tmp_path)
    assert len(torch.load(ckpt, weights_only=True)["model"]) == data["num_saved_keys"] == 346
    state = convert_blip2.load_checkpoints(ckpt, vision)
    assert set(state) == set(data["keys"])  # the pair is exactly LAVIS's model: the 40th block dropped
    with torch.device("meta"):
        referee, head = convert_blip2.build_models(state, ckpt)
    v, q = referee.config.vision_config, referee.config.qformer_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (1408, 39, 16, 6144)
    assert (v.image_size, v.patch_size, v.layer_norm_eps, v.post_layernorm_eps) == (224, 14, 1e-6, 1e-5)
    assert (q.hidden_size, q.num_hidden_layers, q.num_attention_heads, q.vocab_size) == (768, 12, 12, 30523)
    assert (q.cross_attention_frequency, q.encoder_hidden_size, referee.config.num_query_tokens) == (2, 1408, 32)
    note("BLIP-2 full size: vision " + json.dumps({k: getattr(v, k) for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size", "patch_size",
        "layer_norm_eps", "post_layernorm_eps")}))
    note("BLIP-2 full size: qformer " + json.dumps({k: getattr(q, k) for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
        "cross_attention_frequency", "encoder_hidden_size", "max_position_embeddings")})
        + f", queries {referee.config.num_query_tokens}, projection {referee.config.image_text_hidden_size}")


def test_full_size_merged_file_with_40_blocks_is_refused(tmp_path: Path) -> None:
    ckpt, vision = _released_blip2(tmp_path)
    merged = {**torch.load(ckpt, weights_only=True)["model"],
              **{"visual_encoder." + k: v for k, v in torch.load(vision, weights_only=True).items()}}
    torch.save({"model": merged}, tmp_path / "merged.pth")
    with pytest.raises(convert_blip2.UserError, match="40 blocks, but LAVIS's BLIP-2 uses 39"):
        convert_blip2.load_checkpoints(tmp_path / "merged.pth", None)


def test_full_size_blip_vqa_maps_completely(tmp_path: Path, bert_tokenizer_dir: Path, note) -> None:
    data = _keys("blip_vqa_keys.json")
    torch.save({"model": {k: _meta(shape, dtype) for k, (shape, dtype) in data["keys"].items()}},
               tmp_path / "model_base_vqa_capfilt_large.pth")
    path = tmp_path / "model_base_vqa_capfilt_large.pth"
    state = convert_blip_vqa.load_original(path)
    tok = convert_blip_vqa.load_tokenizer(bert_tokenizer_dir)
    assert len(tok) == data["tokenizer_len"]
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [data["bos_token_id"], data["enc_token_id"]]
    config = convert_blip_vqa.infer_config(state, tok, path)
    with torch.device("meta"):
        convert_blip_vqa.build_model(state, config, path)
    v, t = config.vision_config, config.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.image_size, v.patch_size) == (
        768, 12, 12, 480, 16)
    assert (t.hidden_size, t.num_hidden_layers, t.vocab_size, t.bos_token_id) == (768, 12, 30524, 30522)
    note("BLIP VQA full size: vision " + json.dumps({k: getattr(v, k) for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size", "patch_size",
        "layer_norm_eps")}))
    note("BLIP VQA full size: text " + json.dumps({k: getattr(t, k) for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
        "max_position_embeddings", "bos_token_id", "pad_token_id", "sep_token_id")}))
