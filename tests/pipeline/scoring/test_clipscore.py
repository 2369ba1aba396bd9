"""CLIPScore as CLIPScore_eval computes it: OpenAI's transform, the text, the cosine (tiny CLIP)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.io.compbench_data import COMPBENCH_DIR
from pipeline.scoring.clipscore import (
    ClipScorer,
    clean_text,
    clip_pixels,
    cosine,
    crop_box,
    format_score,
    resized_size,
    without_adjectives,
)

# Float results that depend on the CPU's kernels: `make test-numerics` runs them on other kernel paths.
pytestmark = pytest.mark.numerics

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def scorer(tiny_cfg) -> ClipScorer:
    from pipeline.models.loading import load_clip

    return ClipScorer(load_clip(tiny_cfg.models, tiny_cfg.scoring.clip_model), tiny_cfg)


def test_resize_and_crop_follow_torchvision() -> None:
    assert resized_size(61, 40, 32) == (int(32 * 61 / 40), 32)  # shortest side -> 32, long side truncated
    assert resized_size(40, 61, 32) == (32, 48)
    # CenterCrop offsets: int(round((d - size) / 2)), Python's round half to even
    assert crop_box(35, 32, 32) == (2, 0, 34, 32)  # (35 - 32) / 2 = 1.5 -> 2 (transformers' // would give 1)
    assert crop_box(33, 32, 32) == (0, 0, 32, 32)  # 0.5 -> 0
    assert crop_box(37, 32, 32) == (2, 0, 34, 32)  # 2.5 -> 2


def test_pixels_by_hand() -> None:
    """PIL bicubic to the short side, the centre crop, /255, CLIP's mean and std, computed here by hand."""
    image = _image(70, 50)
    got = clip_pixels(image, 32, MEAN, STD)
    new_w = int(32 * 70 / 50)  # 44
    resized = np.asarray(image.resize((new_w, 32), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
    left = int(round((new_w - 32) / 2.0))
    crop = resized[:, left:left + 32, :]
    want = (crop - np.array(MEAN)) / np.array(STD)
    assert got.shape == (3, 32, 32)
    assert np.allclose(got.permute(1, 2, 0).numpy(), want, atol=1e-6)


def test_pixels_match_transformers_clip_processor_where_crops_agree() -> None:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    for w, h in [(61, 40), (40, 61), (64, 64), (100, 30)]:
        image = _image(w, h, seed=w)
        want = proc(images=image, return_tensors="pt").pixel_values[0]
        assert torch.equal(clip_pixels(image, 32, MEAN, STD), want)


def test_score_is_the_plain_cosine_of_the_projected_features(scorer: ClipScorer) -> None:
    """Against CLIPModel's own forward: logits_per_image = logit_scale.exp() x cosine."""
    image, prompt = _image(64, 64), "a red apple on a table"
    result = scorer.score_pil(image, prompt)
    model, tok = scorer.clip.model, scorer.clip.tokenizer
    ids = torch.tensor([tok(prompt).input_ids])
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=clip_pixels(image, 32, MEAN, STD).unsqueeze(0))
    hand = (out.logits_per_image / model.logit_scale.exp()).item()
    assert result.score == pytest.approx(hand, abs=1e-6)
    assert -1.0 <= result.score <= 1.0 and result.text == prompt and not result.truncated
    assert format_score(result.score) == result.score  # written unrounded, as the benchmark's json.dumps


def test_cosine_normalises_each_side() -> None:
    a, b = torch.tensor([[3.0, 4.0]]), torch.tensor([[6.0, 8.0]])
    assert cosine(a, b).item() == pytest.approx(1.0)
    assert cosine(a, torch.tensor([[-4.0, 3.0]])).item() == pytest.approx(0.0)


def test_complex_text_drops_adjectives(scorer: ClipScorer, tiny_cfg) -> None:
    assert without_adjectives("a red apple and a green leaf", tiny_cfg.vqa.spacy_model) == "a apple and a leaf"
    assert scorer.score_pil(_image(64, 64), "a red apple", complex_prompt=True).text == "a apple"


def test_long_prompts_are_truncated_and_say_so(scorer: ClipScorer) -> None:
    result = scorer.score_pil(_image(64, 64), " ".join(["apple"] * 100))
    assert result.truncated and -1.0 <= result.score <= 1.0


def test_record_says_tiny_is_not_exact(scorer: ClipScorer) -> None:
    assert scorer.record["exact"] is False and scorer.record["label"] == "CLIPScore (approximate)"
    assert any("tiny" in d for d in scorer.record["deviations"])


def test_text_is_cleaned_as_openai_does_and_benchmark_prompts_need_no_ftfy() -> None:
    assert clean_text("  a cat &amp;amp; a  dog\n") == "a cat & a dog"  # unescaped twice, whitespace collapsed
    for path in COMPBENCH_DIR.glob("*_val*.txt"):  # ftfy.fix_text only repairs (non-ASCII) mojibake
        assert path.read_text(encoding="utf-8").isascii(), path.name
