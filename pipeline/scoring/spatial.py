"""T2I-CompBench's 2D-spatial rule (``UniDet_eval/2D_spatial_eval.py``) on an OWLv2 detector.

The rule, reproduced as the benchmark writes it:

- objects: the prompt's first and last NOUN (complex prompts: the nouns around its prepositions),
  "girl"/"boy"/"man"/"woman" -> "person"; relation: the first of its phrases found in the prompt
  (``pipeline.scoring.spatial_prompt``);
- each object's box is the FIRST detection of its class (the benchmark's ``obj.index``; detections
  are in decreasing confidence, so the most confident one);
- both found: 0.25 x each confidence + position / 2; one found: 0.25 x its confidence; none: 0;
  a score below 0.5 becomes 0;
- position, from box centres (B minus A) and IoU: "next to", "on side of", "near": 1 if either
  |dx| or |dy| < 150 px, else 150 / max(|dx|, |dy|); "on the left of" needs dx > 0 and "on the right
  of" dx < 0, "on the top of" dy > 0 and "on the bottom of" dy < 0, with the dominant axis along the
  relation: 1 when IoU < 0.1, else 0.1 / IoU; every other case 0, "on top of" included (in the
  benchmark's phrase list, but its rule has no branch for it).

What is substituted: the detector. UniDet (RS200, confidence above 0.1 -- its CLI's 0.5 is ignored:
the unified cascade head passes a literal 0.1 to its inference -- on the image resized so its short
side is 479 px, long side at most 480) is not installable beside this stack; OWLv2 (open vocabulary,
queried with the two object names) finds the boxes instead, keeping those above
``scoring.detection_threshold`` (strictly, as transformers' post-processing and detectron2 do).
``scoring.spatial_vocabulary: unidet`` queries only nouns that are UniDet label names, so a noun the
benchmark can never find scores as it does there (not found); ``open`` queries every noun.
Its boxes are mapped to the benchmark's pixel scale (479-px short side) because the 150-px
distance threshold is measured there. Scores are therefore labelled ``spatial (detector: ID)``,
never benchmark-exact.

OWLv2's image processor needs scipy; the preprocessing here is torch: padding to a square at the
bottom/right with grey 0.5 (the original OWLv2's, and transformers 4.x's; 5.x pads with 0; the
benchmark's 512-px squares need none), bilinear resize with antialiasing to the model's size (the
processor smooths with a Gaussian then resizes linearly: close, not bit-equal), CLIP mean/std.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.config import Config, ScoringConfig
from pipeline.models.loading import ZooModel
from pipeline.models.owlv2_pixels import pad_resize
from pipeline.scoring.spatial_prompt import RuleInput, rule_input
from pipeline.scoring.spatial_vocabulary import findable, unfindable

NEAR = ("next to", "on side of", "near")


@dataclass(frozen=True)
class Box:
    x_min: float
    y_min: float
    x_max: float
    y_max: float

    @property
    def center(self) -> tuple[float, float]:
        return (self.x_min + self.x_max) / 2, (self.y_min + self.y_max) / 2

    @property
    def area(self) -> float:
        return (self.x_max - self.x_min) * (self.y_max - self.y_min)


@dataclass(frozen=True)
class Detection:
    label: str
    score: float
    box: Box


# --- the rule (pure: tested on hand-made boxes) --------------------------------------------------


def iou(a: Box, b: Box) -> float:
    """The benchmark's IoU (overlap clipped at 0); 0 for two empty boxes, where it would divide by 0."""
    x_overlap = max(0.0, min(a.x_max, b.x_max) - max(a.x_min, b.x_min))
    y_overlap = max(0.0, min(a.y_max, b.y_max) - max(a.y_min, b.y_min))
    inter = x_overlap * y_overlap
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


def _directional(along: float, across: float, overlap: float, iou_threshold: float) -> float:
    """Dominant axis along the relation: 1 when the boxes barely overlap, else iou_threshold / IoU."""
    if abs(along) <= abs(across):
        return 0.0
    return 1.0 if overlap < iou_threshold else iou_threshold / overlap


def position_score(relation: str | None, a: Box, b: Box, iou_threshold: float, distance_threshold: float) -> float:
    """The benchmark's ``determine_position(locality, box1=A, box2=B)``."""
    (ax, ay), (bx, by) = a.center, b.center
    dx, dy = bx - ax, by - ay
    overlap = iou(a, b)
    if relation in NEAR:
        if abs(dx) < distance_threshold or abs(dy) < distance_threshold:
            return 1.0
        return distance_threshold / max(abs(dx), abs(dy))
    if relation == "on the right of":  # A right of B: B's centre is left of A's
        return _directional(dx, dy, overlap, iou_threshold) if dx < 0 else 0.0
    if relation == "on the left of":
        return _directional(dx, dy, overlap, iou_threshold) if dx > 0 else 0.0
    if relation == "on the bottom of":
        return _directional(dy, dx, overlap, iou_threshold) if dy < 0 else 0.0
    if relation == "on the top of":
        return _directional(dy, dx, overlap, iou_threshold) if dy > 0 else 0.0
    return 0.0  # "on top of", no relation: no branch in the benchmark's rule


def first_of(label: str | None, detections: list[Detection]) -> Detection | None:
    """The benchmark's ``obj.index(name)``: the first detection of that class."""
    return next((d for d in detections if label is not None and d.label == label), None)


def rule_score(parse: RuleInput, detections: list[Detection], scfg: ScoringConfig) -> float:
    """The image's spatial score from its detections (in decreasing confidence, benchmark pixel scale)."""
    a, b = first_of(parse.subject, detections), first_of(parse.object, detections)
    w = scfg.object_weight
    if a is not None and b is not None:
        score = w * a.score + w * b.score
        score += position_score(parse.relation, a.box, b.box, scfg.iou_threshold, scfg.distance_threshold) \
            * scfg.position_weight
    elif a is not None or b is not None:
        score = w * (a or b).score
    else:
        score = 0.0
    return 0.0 if score < scfg.min_score else score


# --- the benchmark's pixel scale ----------------------------------------------------------------


def benchmark_size(width: int, height: int, short_side: int, max_side: int) -> tuple[int, int]:
    """torchvision ``Resize(size=short_side, max_size=max_side)`` on a W x H image: the size UniDet saw."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = short_side, int(short_side * long / short)
    if new_long > max_side:
        new_short, new_long = int(max_side * new_short / new_long), max_side
    return (new_short, new_long) if width <= height else (new_long, new_short)


# --- OWLv2 detection ----------------------------------------------------------------------------


class OwlDetector:
    """OWLv2 queried with object names; boxes in the benchmark's pixel scale, most confident first."""

    def __init__(self, zoo: ZooModel, cfg: Config) -> None:
        self.zoo = zoo
        self.scfg = cfg.scoring
        self.size = int(zoo.model.config.vision_config.image_size)  # 960 for owlv2-base-patch16
        self.max_text = int(zoo.model.config.text_config.max_position_embeddings)  # OWL's 16 tokens
        # OWLv2's processor normalises with OpenAI CLIP's mean/std, the same numbers as CLIPScore's.
        self._mean = torch.tensor(self.scfg.clip_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(self.scfg.clip_std, dtype=torch.float32).view(1, 3, 1, 1)

    def pixels(self, image: Any) -> tuple[torch.Tensor, int]:
        """A PIL image -> (normalised ``[1, 3, S, S]``, the padded square's side in image pixels)."""
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
        x = torch.from_numpy(rgb).permute(2, 0, 1).float().unsqueeze(0) / 255.0
        side = max(x.shape[-2:])
        x = pad_resize(x, self.size, self.scfg.detector_pad_value)
        return (x - self._mean) / self._std, side

    def detect(self, image: Any, queries: list[str]) -> list[Detection]:
        if not queries:
            return []
        pixels, side = self.pixels(image)
        tok = self.zoo.tokenizer(queries, padding="max_length", max_length=self.max_text, truncation=True,
                                 return_tensors="pt")
        dev = self.zoo.device
        with torch.no_grad():
            out = self.zoo.model(input_ids=tok.input_ids.to(dev), attention_mask=tok.attention_mask.to(dev),
                                 pixel_values=pixels.to(dev))
        probs = torch.sigmoid(out.logits[0].float())  # [boxes, queries]
        scores, labels = probs.max(dim=-1)
        return self._to_detections(out.pred_boxes[0].float().cpu(), scores.cpu(), labels.cpu(), queries, side,
                                   image.size)

    def _to_detections(self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, queries: list[str],
                       side: int, size: tuple[int, int]) -> list[Detection]:
        w, h = size
        bw, bh = benchmark_size(w, h, self.scfg.benchmark_short_side, self.scfg.benchmark_max_side)
        sx, sy = bw / w, bh / h
        cx, cy, bwid, bhgt = (boxes * side).unbind(-1)  # (cx, cy, w, h) of the padded square -> image pixels
        xyxy = torch.stack([(cx - bwid / 2).clamp(0, w), (cy - bhgt / 2).clamp(0, h),
                            (cx + bwid / 2).clamp(0, w), (cy + bhgt / 2).clamp(0, h)], -1)
        keep = torch.nonzero(scores > self.scfg.detection_threshold).flatten().tolist()
        keep.sort(key=lambda i: -float(scores[i]))  # decreasing confidence, as UniDet's instances
        return [Detection(queries[int(labels[i])], float(scores[i]),
                          Box(float(xyxy[i, 0]) * sx, float(xyxy[i, 1]) * sy, float(xyxy[i, 2]) * sx,
                              float(xyxy[i, 3]) * sy)) for i in keep]


@dataclass
class SpatialResult:
    score: float
    subject: str | None
    relation: str | None
    object: str | None
    scorable: bool = True
    detections: list[dict] = field(default_factory=list)  # the two objects' first detections
    unfindable: list[str] = field(default_factory=list)  # nouns outside the vocabulary (never found)


class SpatialScorer:
    """The benchmark's 2D rule on OWLv2 detections of the prompt's two objects."""

    def __init__(self, detector: OwlDetector, cfg: Config) -> None:
        self.detector = detector
        self.cfg = cfg

    def score_pil(self, image: Any, prompt: str, complex_prompt: bool = False) -> SpatialResult:
        parse = rule_input(prompt, self.cfg.vqa.spacy_model, complex_prompt)
        vocabulary = self.cfg.scoring.spatial_vocabulary
        # A noun the vocabulary cannot name is never queried, so no detection carries it: not found.
        queries = list(dict.fromkeys(q for q in (parse.subject, parse.object) if findable(q, vocabulary)))
        detections = self.detector.detect(image, queries)
        chosen = [d for d in (first_of(parse.subject, detections), first_of(parse.object, detections)) if d]
        return SpatialResult(score=rule_score(parse, detections, self.cfg.scoring), subject=parse.subject,
                             relation=parse.relation, object=parse.object, scorable=parse.parsed,
                             detections=[{**asdict(d.box), "label": d.label, "score": d.score} for d in chosen],
                             unfindable=unfindable((parse.subject, parse.object), vocabulary))
