"""An open-vocabulary detector (OWLv2) as a referee for T2I-CompBench's 2D-spatial prompts.

The prompt is read by ``pipeline.scoring.spatial_prompt.parse_spatial`` (the benchmark's own parse) into
(A, relation, B); a prompt it cannot parse gets zero weight from this referee (recorded, not an error).
Per view, the detector scores every box for the queries "a photo of a A" and "... B". For each object:
  w_k      = softmax over boxes k of logit_k / T        (a soft argmax: which box is the object)
  presence = sum_k w_k sigmoid(logit_k)                   (confidence of the chosen box, soft)
  centre   = sum_k w_k centre_k                           (soft box centre, image units, y down)
loss = -log presence_A - log presence_B + relation term (the logs computed in log space, so an absent
object still pulls towards appearing), with s = detector_sharpness:
  left of / right of / on (the) top of / on the bottom of: d = the centres' difference along the relation's
  axis, signed so that d > 0 when it holds; term = softplus(s (margin - d)) / s
  near / next to / on side of: dist = |centre_A - centre_B|;
  term = softplus(s (dist - near)) / s + softplus(s (min_separation - dist)) / s (close, yet two boxes)
Match score of the final image: presence_A x presence_B x P(relation), P = the sigmoids of the same hinges.

Preprocessing is the OWLv2 processor's, in torch (differentiable; its own processor needs scipy): pad to a
square with 0.5 grey at the bottom/right, bilinear resize to the detector's image size; the engine then
augments and CLIP-normalises (OWLv2 uses OpenAI CLIP's mean/std). Views: the entry's ``views`` (the zoo
preset uses a few, see docs/ARCHITECTURE.md "Referee zoo").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipeline.config import ZooConfig
from pipeline.models.loading import DTYPES, load_detector
from pipeline.models.owlv2_pixels import pad_resize
from pipeline.referees.base import EncodedPrompts, RefereeContext, TensorRows, ViewLosses, ZooReferee
from pipeline.scoring.spatial_prompt import SpatialPrompt, parse_spatial

# Relation phrase -> (axis, sign): d = sign * (centre_B - centre_A)[axis] > 0 when it holds (y grows down).
DIRECTIONAL = {
    "on the left of": (0, 1.0), "on the right of": (0, -1.0),
    "on the top of": (1, 1.0), "on top of": (1, 1.0), "on the bottom of": (1, -1.0),
}
NEARNESS = ("near", "next to", "on side of")
NEAR_CODE = -1  # axis code of a nearness relation in the rows
_CACHE_SIZE = 4096
_EPS = 1e-6

UNPARSED = "no 2D-spatial relation with two nouns in the prompt (pipeline.scoring.spatial_prompt)"


def soft_detections(logits: torch.Tensor, boxes: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per object query: (log presence [n, Q], soft centre [n, Q, 2]) from box logits [n, P, Q], boxes [n, P, 4].

    log presence = log sum_k w_k sigmoid(logit_k), in log space: an absent object (every sigmoid ~ 0) still
    gets a gradient towards appearing, which a clamp before the log would cut off."""
    logits = logits.float()
    log_w = torch.log_softmax(logits / temperature, dim=1)  # over boxes
    log_presence = torch.logsumexp(log_w + F.logsigmoid(logits), dim=1)
    centres = torch.einsum("npq,npc->nqc", log_w.exp(), boxes[..., :2].float())
    return log_presence, centres


def relation_terms(centres: torch.Tensor, axis: torch.Tensor, sign: torch.Tensor,
                   zc: ZooConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(hinge loss [n], probability [n]) of the relation of each row, from centres [n, 2(A, B), 2(x, y)].

    ``axis`` [n] is 0 (x), 1 (y) or NEAR_CODE; ``sign`` [n] orients a directional relation."""
    s = zc.detector_sharpness
    diff = centres[:, 1] - centres[:, 0]  # B - A
    along = diff.gather(1, axis.clamp_min(0)[:, None])[:, 0] * sign
    dir_loss = F.softplus(s * (zc.detector_margin - along)) / s
    dir_prob = torch.sigmoid(s * (along - zc.detector_margin))
    dist = (diff.square().sum(dim=1) + _EPS).sqrt()
    near_loss = (F.softplus(s * (dist - zc.detector_near)) + F.softplus(s * (zc.detector_min_separation - dist))) / s
    near_prob = torch.sigmoid(s * (zc.detector_near - dist)) * torch.sigmoid(s * (dist - zc.detector_min_separation))
    near = axis == NEAR_CODE
    return torch.where(near, near_loss, dir_loss), torch.where(near, near_prob, dir_prob)


def relation_code(relation: str) -> tuple[int, float]:
    return (NEAR_CODE, 1.0) if relation in NEARNESS else DIRECTIONAL[relation]


class DetectorReferee(ZooReferee):
    kind = "detector"

    def __init__(self, ctx: RefereeContext) -> None:
        super().__init__(ctx)
        self._adopt(load_detector(ctx.cfg.models, ctx.model_id, DTYPES[ctx.cfg.models.dtype]))
        self.zc = ctx.cfg.zoo
        self.spacy_model = ctx.cfg.vqa.spacy_model
        self._queries = functools.lru_cache(maxsize=_CACHE_SIZE)(self._embed_query)  # bounded: endless prompts
        self._parses = functools.lru_cache(maxsize=_CACHE_SIZE)(lambda p: parse_spatial(p, self.spacy_model))

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        return pad_resize(images, self.image_size)

    def parse(self, prompt: str) -> SpatialPrompt | None:
        return self._parses(prompt)

    @torch.no_grad()
    def _embed_query(self, noun: str) -> torch.Tensor:
        text = self.zc.detector_query.format(noun)
        ids = self.tokenizer([text], truncation=True, max_length=self._max_tokens, padding="max_length",
                             return_tensors="pt")
        out = self.model.owlv2.get_text_features(**{k: v.to(self.device) for k, v in ids.items()}).pooler_output
        return out[0]

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        parses = [self.parse(p) for p in prompts]
        queries, axes, signs = [], [], []
        for sp in parses:
            if sp is None:
                queries.append(None)
                axes.append(0)
                signs.append(1.0)
                continue
            queries.append(torch.stack([self._queries(sp.subject), self._queries(sp.object)]))
            axis, sign = relation_code(sp.relation)
            axes.append(axis)
            signs.append(sign)
        # Unparsed prompts get placeholder rows: the zoo never runs this referee on them.
        shape, dtype = (2, self.model.config.projection_dim), self.model.dtype
        filled = [q if q is not None else torch.zeros(shape, dtype=dtype, device=self.device) for q in queries]
        rows = TensorRows({
            "queries": torch.stack(filled),
            "axis": torch.tensor(axes, dtype=torch.long, device=self.device),
            "sign": torch.tensor(signs, dtype=torch.float32, device=self.device),
        })
        return EncodedPrompts(rows, [None if sp is not None else UNPARSED for sp in parses])

    def detections(self, pixels: torch.Tensor, rows: TensorRows) -> tuple[torch.Tensor, torch.Tensor]:
        """(log presence [n, 2], soft centres [n, 2, 2]) of objects A and B in each view."""
        feature_map, _ = self.model.image_embedder(pixel_values=pixels.to(self.model.dtype))
        n, h, w, d = feature_map.shape
        feats = feature_map.reshape(n, h * w, d)
        logits, _ = self.model.class_predictor(feats, rows["queries"].to(feats.dtype), None)
        boxes = self.model.box_predictor(feats, feature_map)
        return soft_detections(logits, boxes, self.zc.detector_box_temperature)

    def losses(self, pixels: torch.Tensor, rows: TensorRows) -> ViewLosses:
        log_presence, centres = self.detections(pixels, rows)
        rel_loss, rel_prob = relation_terms(centres, rows["axis"], rows["sign"], self.zc)
        total = -log_presence.sum(dim=1) + rel_loss
        presence = log_presence.exp()
        return ViewLosses(total, {"presence_a": presence[:, 0], "presence_b": presence[:, 1],
                                  "relation": rel_prob})

    def match(self, losses: ViewLosses) -> torch.Tensor:
        p = losses.parts
        return p["presence_a"] * p["presence_b"] * p["relation"]
