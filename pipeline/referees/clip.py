"""CLIP as a referee: loss = 1 - cosine(image embedding of the view, text embedding of the prompt).

transformers' ``CLIPModel`` (real default ``openai/clip-vit-large-patch14``, the family SD 1.5's text
encoder comes from). Views are made at the vision tower's resolution and CLIP-normalised by the engine
(``augment.clip_mean/std``, OpenAI CLIP's own numbers). Text embeddings are computed once per prompt.
The match score of the final image is max(cosine, 0) (CLIPScore with w = 1).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipeline.models.loading import DTYPES, load_clip
from pipeline.referees.base import EncodedPrompts, RefereeContext, TensorRows, ViewLosses, ZooReferee

_CACHE_SIZE = 4096  # prompt embeddings kept (LRU), as the BLIP-2 referee's token ids


class ClipReferee(ZooReferee):
    kind = "clip"

    def __init__(self, ctx: RefereeContext) -> None:
        super().__init__(ctx)
        self._adopt(load_clip(ctx.cfg.models, ctx.model_id, DTYPES[ctx.cfg.models.dtype]))
        self._cache = functools.lru_cache(maxsize=_CACHE_SIZE)(self._embed_text)  # bounded: endless prompts

    @torch.no_grad()
    def _embed_text(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer([prompt], truncation=True, max_length=self._max_tokens, return_tensors="pt")
        out = self.model.get_text_features(**{k: v.to(self.device) for k, v in ids.items()}).pooler_output
        return F.normalize(out.float(), dim=-1)[0]

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        emb = torch.stack([self._cache(p) for p in prompts])
        return EncodedPrompts(TensorRows({"text": emb}), [None] * len(prompts))

    def cosine(self, pixels: torch.Tensor, rows: TensorRows) -> torch.Tensor:
        image = self.model.get_image_features(pixel_values=pixels.to(self.model.dtype)).pooler_output
        return (F.normalize(image.float(), dim=-1) * rows["text"]).sum(dim=-1)

    def losses(self, pixels: torch.Tensor, rows: TensorRows) -> ViewLosses:
        cos = self.cosine(pixels, rows)
        return ViewLosses(1.0 - cos, {"cosine": cos})

    def match(self, losses: ViewLosses) -> torch.Tensor:
        return losses.parts["cosine"].clamp_min(0.0)
