"""BLIP-2 referee: LAVIS's released pair (blip2_pretrained.pth + eva_vit_g.pth) -> the CLI converter ->
the project's loader and losses, against LAVIS's Blip2Qformer on the same weights and inputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config_loading import load_config
from pipeline.models.loading import load_generator_models, model_sources
from pipeline.referees.blip2 import Referee, TextBatch
from tests.conftest import ROOT
from tests.parity.settings import SUBPROCESS_TIMEOUT

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def ref(reference_dir: Path) -> dict:
    return torch.load(reference_dir / "blip2_reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def referee_dir(reference_dir: Path, bert_tokenizer_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "blip2-referee"
    proc = subprocess.run(
        [sys.executable, "jobs/convert_checkpoints.py", "blip2",
         "--lavis-checkpoint", str(reference_dir / "blip2_pretrained.pth"),
         "--vision-checkpoint", str(reference_dir / "eva_vit_g.pth"),
         "--output", str(out), "--tokenizer", str(bert_tokenizer_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def referee(referee_dir: Path, tiny_cfg) -> Referee:
    # Only the referee is compared; the tiny Stable Diffusion fills the rest of the model set.
    sd = model_sources(tiny_cfg.models)["stable_diffusion"]
    cfg = load_config(overrides=[f"models.referee={referee_dir}", f"models.stable_diffusion={sd}",
                                 "models.device=cpu", "models.dtype=float32"])
    return Referee(load_generator_models(cfg), cfg.referee)


@pytest.fixture(scope="module")
def text(referee: Referee, ref: dict) -> TextBatch:
    return referee.encode(ref["texts"])


def test_the_released_pair_converts_to_the_vit_lavis_runs(referee: Referee, ref: dict, note) -> None:
    vision = referee.model.config.vision_config
    assert vision.num_hidden_layers == ref["used_vit_blocks"]  # the file has one block more
    assert referee.model.vision_model.post_layernorm.eps == 1e-5
    assert referee.model.vision_model.encoder.layers[0].layer_norm1.eps == 1e-6
    note(f"BLIP-2 converted: ViT {vision.hidden_size}x{vision.num_hidden_layers} of the file's "
         f"{ref['used_vit_blocks'] + 1} blocks, Q-Former {referee.model.config.qformer_config.hidden_size}x"
         f"{referee.model.config.qformer_config.num_hidden_layers}, {referee.num_queries} queries")


def test_token_ids_match_lavis_truncation(referee: Referee, ref: dict, text: TextBatch) -> None:
    full = [len(referee.tokenizer(referee.clean(t)).input_ids) for t in ref["texts"]]
    assert max(full) > 32 and text.ids.shape[1] == 32  # one text is truncated at max_txt_len
    width = text.ids.shape[1]
    assert torch.equal(text.ids, ref["token_ids"][:, :width])
    assert torch.equal(text.mask, ref["token_mask"][:, :width].bool())


def test_image_embeddings(referee: Referee, ref: dict, compare) -> None:
    with torch.no_grad():
        got = referee.image_embeds(ref["pixels"])
    compare("BLIP-2 image embeddings ln_vision(ViT(x))", ref["image_embeds"], got)


def test_itm_logits_and_loss(referee: Referee, ref: dict, text: TextBatch, compare) -> None:
    n = len(ref["texts"])
    pixels = ref["pixels"].repeat_interleave(n, 0)  # every (image, text) pair, image-major
    pairs = TextBatch(text.ids.repeat(n, 1), text.mask.repeat(n, 1))
    with torch.no_grad():
        logits = referee.itm_logits(pixels, pairs)
        loss = referee.losses(pixels, pairs).itm
    compare("BLIP-2 ITM logits (3x3 pairs)", ref["itm_logits"].flatten(0, 1), logits)
    compare("BLIP-2 ITM loss (3x3 pairs)", ref["itm_loss"].flatten(), loss)


def test_caption_logits_and_loss(referee: Referee, ref: dict, text: TextBatch, compare) -> None:
    with torch.no_grad():
        logits = referee.caption_logits(ref["pixels"], text)
        losses = referee.losses(ref["pixels"], text)
    width = text.ids.shape[1]
    compare("BLIP-2 caption logits (real tokens)", ref["caption_logits"][:, :width][text.mask], logits[text.mask])
    # LAVIS averages over every predicted token of the batch; the project gives one mean per row.
    counts = text.mask[:, 1:].sum(dim=1).to(losses.caption.dtype)
    batch_mean = (losses.caption * counts).sum() / counts.sum()
    compare("BLIP-2 caption loss (label smoothing 0.1)", ref["caption_loss"], batch_mean)
