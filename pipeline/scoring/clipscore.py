"""CLIPScore as T2I-CompBench computes it (``CLIPScore_eval/CLIP_similarity.py``), on transformers' CLIPModel.

What the benchmark does, and what this reproduces:

- Model: OpenAI's ViT-B/32 through OpenAI's ``clip`` package; here its transformers port
  ``openai/clip-vit-base-patch32`` (same weights, same architecture: QuickGELU, pre-LN, EOT pooling).
- Image: OpenAI's ``_transform``: resize the shortest side to the model's input size with PIL bicubic
  (the long side ``int(size * long / short)``), centre crop (offsets ``int(round((d - size) / 2))``), then RGB,
  ``/255``, normalise with CLIP's mean and std. Reproduced with PIL and torch (no torchvision).
- Text: the whole prompt, no prefix; for the complex category (its ``--complex`` flag, used by 3-in-1)
  the prompt's spaCy tokens minus adjectives, joined by spaces. Cleaned as OpenAI's tokenizer does
  (html.unescape twice, whitespace collapsed, lower-cased; ftfy's repair of malformed unicode is
  left out: no benchmark prompt has any). OpenAI's tokenizer refuses prompts over 77 tokens; here
  they are truncated (end token kept, as ``truncate=True``) and the result says so.
- Score: cosine of the L2-normalised projected image and text features, no scaling (no 100x, no
  2.5x, no clamp); written to ``vqa_result.json`` as the raw float; the benchmark's mean is the plain
  average over images.
- Precision: float32 (the benchmark's CPU path; on CUDA OpenAI's loader keeps fp16 weights, which moves
  scores by about 1e-3).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.models.loading import ZooModel
from pipeline.scoring.routing import CLIP_NOTES, CLIPSCORE, scorer_record


@dataclass
class ClipResult:
    score: float
    text: str  # what was tokenized (the prompt, or the prompt without adjectives)
    truncated: bool = False  # the text was longer than the context (the benchmark would stop)


# --- OpenAI CLIP's image transform, without torchvision ---------------------------------------


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(size)``: the shortest side becomes ``size``, the long one ``int(size * long / short)``."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """torchvision ``CenterCrop(size)``'s box: offsets rounded half to even, as Python's round."""
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def clip_pixels(image: Any, size: int, mean: list[float], std: list[float]) -> torch.Tensor:
    """A PIL image -> ``[3, size, size]`` float32, in OpenAI CLIP's order: resize, crop, RGB, normalise."""
    from PIL import Image

    w, h = image.size
    new = resized_size(w, h, size)
    if new != (w, h):
        image = image.resize(new, Image.Resampling.BICUBIC)
    image = image.crop(crop_box(new[0], new[1], size)).convert("RGB")
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


def without_adjectives(prompt: str, spacy_model: str) -> str:
    """The benchmark's complex-prompt text: every spaCy token but adjectives, joined by spaces."""
    from pipeline.scoring.questions import load_spacy

    return " ".join(token.text for token in load_spacy(spacy_model)(prompt) if token.pos_ != "ADJ")


def clean_text(text: str) -> str:
    """OpenAI's ``basic_clean`` + ``whitespace_clean`` without ftfy (the tokenizer lower-cases)."""
    return " ".join(html.unescape(html.unescape(text)).split())


def cosine(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of ``[N, D]`` features after L2 normalisation (the benchmark's division)."""
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return (image_features * text_features).sum(dim=-1)


def format_score(score: float) -> float:
    """CLIPScore_eval writes the similarity itself (``json.dumps`` of the float), unrounded."""
    return float(score)


class ClipScorer:
    """Scores stored images against prompts with T2I-CompBench's CLIPScore."""

    def __init__(self, clip: ZooModel, cfg: Config) -> None:
        self.clip = clip
        self.cfg = cfg
        self.scfg = cfg.scoring
        self.image_size = int(clip.model.config.vision_config.image_size)  # 224 for ViT-B/32
        self.record = {**scorer_record(cfg, CLIPSCORE, None), "model_source": clip.source,
                       "image_size": self.image_size, "dtype": "float32", "notes": list(CLIP_NOTES)}

    def text_for(self, prompt: str, complex_prompt: bool = False) -> str:
        return without_adjectives(prompt, self.cfg.vqa.spacy_model) if complex_prompt else prompt

    def _text_ids(self, text: str) -> tuple[torch.Tensor, bool]:
        tok = self.clip.tokenizer
        text = clean_text(text)
        full = tok(text, truncation=False).input_ids
        ids = tok(text, truncation=True, max_length=self.scfg.clip_context_length).input_ids
        return torch.tensor([ids], dtype=torch.long, device=self.clip.device), len(full) > len(ids)

    def features(self, pixels: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected image and text features (the benchmark's ``encode_image`` / ``encode_text``)."""
        model = self.clip.model
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_projection(model.text_model(input_ids=ids).pooler_output)
        return image, text

    def score_pil(self, image: Any, prompt: str, complex_prompt: bool = False) -> ClipResult:
        text = self.text_for(prompt, complex_prompt)
        pixels = clip_pixels(image, self.image_size, self.scfg.clip_mean, self.scfg.clip_std)
        ids, truncated = self._text_ids(text)
        with torch.no_grad():
            img_f, txt_f = self.features(pixels.unsqueeze(0).to(self.clip.device), ids)
            value = float(cosine(img_f.float(), txt_f.float())[0].item())
        return ClipResult(score=value, text=text, truncated=truncated)
