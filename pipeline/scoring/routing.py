"""Which scorer judges a category, and how exactly each scorer reproduces T2I-CompBench.

``scoring.by_category`` maps a category to one of ``SCORER_NAMES``; other categories (and samples
without one) use ``scoring.default``. The benchmark's own choice per Table-3 column:

- color, shape, texture: BLIP-VQA (``blip_vqa``, pipeline/scoring/vqa.py)
- spatial: UniDet + a rule on box centres (``spatial_detector``: the same rule on OWLv2, approximate)
- non_spatial: CLIPScore with OpenAI's ViT-B/32 (``clipscore``)
- complex: 3-in-1, the mean of BLIP-VQA, the spatial rule and CLIPScore (``three_in_one``)

3D-spatial ("in front of", "behind") and numeracy are not supported (``UNSUPPORTED``): the
benchmark's 3D rule needs a depth model and its numeracy rule counts UniDet detections; those
categories fall back to ``scoring.default``.

No torch, no spaCy: the driver and ``jobs/evaluate.py`` build the labels from the config alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pipeline.config import Config, ScoringConfig

BLIP_VQA, CLIPSCORE, SPATIAL, THREE_IN_ONE = "blip_vqa", "clipscore", "spatial_detector", "three_in_one"
# The benchmark's CLIPScore model (OpenAI ViT-B/32) under its transformers name.
BENCHMARK_CLIP = "openai/clip-vit-base-patch32"
# What each scorer loads: the models a run needs follow from its categories.
MODELS_OF = {BLIP_VQA: {"vqa"}, CLIPSCORE: {"clip"}, SPATIAL: {"detector"},
             THREE_IN_ONE: {"vqa", "clip", "detector"}}
# The benchmark's other categories, judged here by scoring.default instead of its own method.
UNSUPPORTED = {
    "3d_spatial": "the benchmark's rule needs its depth model (UniDet_eval/3D_spatial_eval.py)",
    "numeracy": "the benchmark counts UniDet detections (UniDet_eval/numeracy_eval.py)",
}


def scorer_for(category: str | None, scfg: ScoringConfig) -> str:
    """The scorer that judges a sample of ``category``."""
    return scfg.by_category.get(category or "", scfg.default)


def scorers_for(categories: Iterable[str | None], scfg: ScoringConfig) -> list[str]:
    return sorted({scorer_for(c, scfg) for c in categories})


def models_needed(scorers: Iterable[str]) -> set[str]:
    return set().union(*(MODELS_OF[s] for s in scorers)) if scorers else set()


def _model_set(cfg: Config) -> str | None:
    return "tiny" if cfg.models.tiny else "small" if cfg.models.small else None


def clip_deviations(cfg: Config, complex_prompt: bool = False) -> list[str]:
    """How the CLIPScore differs from CLIPScore_eval's (empty: exact up to float rounding)."""
    out: list[str] = []
    if _model_set(cfg):
        out.append(f"{_model_set(cfg)} random-weight CLIP, not ViT-B/32 (scores meaningless)")
    elif cfg.scoring.clip_model != BENCHMARK_CLIP:
        out.append(f"CLIP {cfg.scoring.clip_model}, the benchmark uses OpenAI ViT-B/32 ({BENCHMARK_CLIP})")
    if cfg.scoring.clip_context_length != 77:
        out.append(f"context length {cfg.scoring.clip_context_length}, OpenAI's clip.tokenize uses 77")
    if complex_prompt:
        out += _spacy_deviation(cfg)
    return out


def _spacy_deviation(cfg: Config) -> list[str]:
    from pipeline.scoring.scorer_record import spacy_info

    info = spacy_info(cfg.vqa.spacy_model)
    if info["version"] == cfg.vqa.spacy_version:
        return []
    return [f"spaCy {info['name']} {info['version'] or 'missing'}, the benchmark pins {cfg.vqa.spacy_version}"]


# Not deviations for the benchmark's prompts, but said in the record.
CLIP_NOTES = [
    "transformers' CLIPModel port of ViT-B/32 (same weights and architecture as OpenAI's clip package)",
    "text cleaned as OpenAI's (html.unescape twice, whitespace collapsed, lower-cased) except ftfy.fix_text, "
    "which repairs only mis-encoded (non-ASCII) text; every shipped val prompt is ASCII",
    "float32, the benchmark's CPU path; on CUDA OpenAI's loader keeps fp16 weights (about 1e-3 apart)",
]


# UniDet's effective detection threshold in the benchmark: its CLI's --confidence-threshold 0.5 is
# ignored, the unified cascade head passes a literal 0.1 (unified_roi_heads.py:104-113 at 1b70949).
UNIDET_THRESHOLD = 0.1


def spatial_deviations(cfg: Config) -> list[str]:
    s = cfg.scoring
    model = f"{_model_set(cfg)} random-weight OWLv2" if _model_set(cfg) else s.detector_model
    devs = [f"detector {model} (OWLv2, open-vocabulary), not UniDet RS200: other boxes and confidences"]
    if s.detection_threshold != UNIDET_THRESHOLD:
        devs.append(f"OWLv2 boxes kept above confidence {s.detection_threshold:g} (UniDet's effective threshold "
                    f"is {UNIDET_THRESHOLD:g}; its CLI's 0.5 is ignored)")
    if s.spatial_vocabulary == "open":
        devs.append("open vocabulary: nouns outside UniDet's 722 label names are found too (the benchmark scores "
                    "such prompts 0; scoring.spatial_vocabulary=unidet matches it)")
    return [*devs, *_spacy_deviation(cfg)]


def planned_records(cfg: Config, vqa_record: dict[str, Any] | None, scorers: Iterable[str]) -> dict[str, dict]:
    """Per scorer name: ``{"label", "exact", "deviations", "model"}`` from the config alone."""
    out: dict[str, dict] = {}
    for name in sorted(set(scorers)):
        out[name] = scorer_record(cfg, name, vqa_record)
    return out


def scorer_record(cfg: Config, name: str, vqa_record: dict[str, Any] | None) -> dict[str, Any]:
    s = cfg.scoring
    vqa_devs = list((vqa_record or {}).get("deviations", []))
    if name == BLIP_VQA:
        devs, model = vqa_devs, (vqa_record or {}).get("vqa_weights", cfg.models.vqa)
    elif name == CLIPSCORE:
        devs, model = clip_deviations(cfg), s.clip_model
    elif name == SPATIAL:
        devs, model = spatial_deviations(cfg), s.detector_model
    elif name == THREE_IN_ONE:
        parts = [f"BLIP-VQA: {d}" for d in vqa_devs] + [f"spatial: {d}" for d in spatial_deviations(cfg)]
        parts += [f"CLIPScore: {d}" for d in clip_deviations(cfg, complex_prompt=True)]
        devs, model = list(dict.fromkeys(parts)), f"{cfg.models.vqa} + {s.detector_model} + {s.clip_model}"
    else:
        raise ValueError(f"unknown scorer {name!r}")
    return {"scorer": name, "label": label(name, cfg, not devs), "exact": not devs, "deviations": devs,
            "model": model}


def label(name: str, cfg: Config, exact: bool) -> str:
    """The table's column label: the scorer and whether it is benchmark-exact."""
    how = "exact" if exact else "approximate"
    if name == BLIP_VQA:
        return f"BLIP-VQA ({how})"
    if name == CLIPSCORE:
        return f"CLIPScore ({how})"
    if name == SPATIAL:
        vocabulary = "UniDet vocabulary; " if cfg.scoring.spatial_vocabulary == "unidet" else ""
        return f"spatial (detector: {cfg.scoring.detector_model}; {vocabulary}approximate)"
    return f"3-in-1 ({how}; spatial part on detector {cfg.scoring.detector_model})"
