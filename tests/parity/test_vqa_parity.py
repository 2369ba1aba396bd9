"""BLIP VQA scorer: BLIP's {"model": state_dict} -> the CLI converter -> the project's loader and
scorer, against BLIP_VQA with T2I-CompBench's vqa_prob rule on the same weights, images and questions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config_loading import load_config
from pipeline.models.loading import load_vqa_models
from pipeline.scoring.vqa import VqaScorer, combine, format_score, round_answer
from tests.conftest import ROOT
from tests.parity.settings import SUBPROCESS_TIMEOUT

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def ref(reference_dir: Path) -> dict:
    return torch.load(reference_dir / "vqa_reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def scorer(reference_dir: Path, bert_tokenizer_dir: Path, ref: dict, tmp_path_factory) -> VqaScorer:
    out = tmp_path_factory.mktemp("converted") / "blip-vqa"
    proc = subprocess.run(
        [sys.executable, "jobs/convert_checkpoints.py", "blip-vqa",
         "--checkpoint", str(reference_dir / "model_base_vqa_capfilt_large.pth"),
         "--output", str(out), "--tokenizer", str(bert_tokenizer_dir)],
        cwd=ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    size = ref["images"].shape[-1]  # the reduced model's own size: no position interpolation
    cfg = load_config(overrides=[f"models.vqa={out}", f"vqa.image_size={size}", "models.device=cpu",
                                 "models.dtype=float32"])
    return VqaScorer(load_vqa_models(cfg), cfg)


@pytest.fixture(scope="module")
def probs(scorer: VqaScorer, ref: dict) -> list[torch.Tensor]:
    images = [img.float() / 255.0 for img in ref["images"]]
    with torch.no_grad():
        return scorer.answer_probs(images, ref["questions"])


def test_questions_cover_padding_and_truncation(ref: dict, scorer: VqaScorer) -> None:
    lengths = ref["question_token_lengths"]
    assert len(set(lengths)) > 2 and max(lengths) > scorer.vcfg.max_question_tokens


def test_answer_per_question(probs: list[torch.Tensor], ref: dict, compare) -> None:
    compare("BLIP VQA p(yes)/(p(yes)+p(no)) per question", torch.cat(ref["probs"]), torch.cat(probs))


def test_image_score(probs: list[torch.Tensor], ref: dict, scorer: VqaScorer, compare, note) -> None:
    compare("BLIP VQA image score (product of unrounded answers)",
            torch.stack([p.prod() for p in ref["probs"]]), torch.stack([p.double().prod() for p in probs]))
    digits = scorer.vcfg.round_digits
    written = [format_score(combine([round_answer(x, digits) for x in p.tolist()], digits), digits) for p in probs]
    # 4-decimal strings can flip on a 1e-7 difference: compared within one unit of the 4th decimal.
    compare("BLIP VQA image score as written (4 decimals)", torch.tensor([float(s) for s in ref["scores"]]),
            torch.tensor([float(s) for s in written]), tolerance=1e-4)
    note(f"BLIP VQA scores as written: original {ref['scores']}, project {written}")
