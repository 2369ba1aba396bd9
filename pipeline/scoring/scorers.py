"""The scorers of a run, picked per category (``scoring.by_category``) and loaded on first need.

A run of spatial prompts loads OWLv2 and nothing else; a colour-only run loads BLIP-VQA only.
Every judgement says which scorer made it (the sample's ``scorer`` field) and, for 3-in-1, the
three parts. Models load outside the timed scoring (``prepare``) so a sample's ``score_seconds``
never includes a model load.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Config
from pipeline.models.loading import VqaModels
from pipeline.scoring.routing import (
    BLIP_VQA,
    CLIPSCORE,
    MODELS_OF,
    SPATIAL,
    THREE_IN_ONE,
    planned_records,
    scorer_for,
)
from schemas.gors import reward_answer

COMPLEX_CATEGORY = "complex"  # the benchmark runs its spatial and CLIP scorers in --complex mode here


@dataclass
class Judgement:
    scorer: str
    score: float
    questions: list[str] = field(default_factory=list)  # BLIP-VQA's (also 3-in-1's attribute part)
    answers: list[float] = field(default_factory=list)
    parts: dict[str, float] = field(default_factory=dict)  # per scorer name (3-in-1: its three parts)
    scorable: bool = True
    note: str | None = None  # e.g. why the prompt is unscorable, or that it was truncated


class ScorerSet:
    """Lazily built scorers sharing one config; ``vqa`` may be models loaded already."""

    def __init__(self, cfg: Config, vqa: VqaModels | None = None) -> None:
        self.cfg = cfg
        self._vqa_models = vqa
        self._models: dict[str, Any] = {}

    # -- loading --

    def scorer_name(self, category: str | None) -> str:
        return scorer_for(category, self.cfg.scoring)

    def prepare(self, names: Iterable[str]) -> None:
        for name in names:
            for kind in sorted(MODELS_OF[name]):
                self._scorer(kind)

    def use(self, kind: str, scorer: Any) -> None:
        """Give the set a scorer built already (``kind``: vqa, clip or detector)."""
        self._models[kind] = scorer

    def _scorer(self, kind: str) -> Any:
        if kind not in self._models:
            self._models[kind] = self._build(kind)
        return self._models[kind]

    def _build(self, kind: str) -> Any:
        from pipeline.models import loading

        m, s = self.cfg.models, self.cfg.scoring
        if kind == "vqa":
            from pipeline.scoring.vqa import VqaScorer

            return VqaScorer(self._vqa_models or loading.load_vqa_models(self.cfg), self.cfg)
        if kind == "clip":
            from pipeline.scoring.clipscore import ClipScorer

            return ClipScorer(loading.load_clip(m, s.clip_model), self.cfg)
        from pipeline.scoring.spatial import OwlDetector, SpatialScorer

        return SpatialScorer(OwlDetector(loading.load_detector(m, s.detector_model), self.cfg), self.cfg)

    @property
    def vqa(self) -> Any:
        return self._scorer("vqa")

    def loaded(self) -> list[str]:
        return sorted(self._models)

    def records(self, names: Iterable[str]) -> dict[str, dict]:
        vqa_record = self._models["vqa"].record if "vqa" in self._models else None
        return planned_records(self.cfg, vqa_record, names)

    # -- judging --

    def judge(self, image: Any, prompt: str, category: str | None) -> Judgement:
        """The score of one stored image (PIL) by its category's scorer."""
        name = self.scorer_name(category)
        complex_prompt = category == COMPLEX_CATEGORY
        if name == BLIP_VQA:
            return self._vqa(image, prompt)
        if name == CLIPSCORE:
            return self._clip(image, prompt, complex_prompt)
        if name == SPATIAL:
            return self._spatial(image, prompt, complex_prompt)
        if name == THREE_IN_ONE:
            return self._three_in_one(image, prompt)
        raise ValueError(f"unknown scorer {name!r}")

    def _vqa(self, image: Any, prompt: str) -> Judgement:
        r = self.vqa.score_stored([image], [prompt])[0]
        note = None if r.questions else "no noun chunk to ask about: score 1.0 by the benchmark's definition"
        return Judgement(BLIP_VQA, r.score, list(r.questions), list(r.answers), {BLIP_VQA: r.score},
                         bool(r.questions), note)

    def _clip(self, image: Any, prompt: str, complex_prompt: bool) -> Judgement:
        r = self._scorer("clip").score_pil(image, prompt, complex_prompt)
        note = f"prompt truncated to {self.cfg.scoring.clip_context_length} tokens" if r.truncated else None
        return Judgement(CLIPSCORE, r.score, parts={CLIPSCORE: r.score}, note=note)

    def _spatial(self, image: Any, prompt: str, complex_prompt: bool) -> Judgement:
        r = self._scorer("detector").score_pil(image, prompt, complex_prompt)
        note = None if r.scorable else "no noun to detect: the benchmark's rule cannot read this prompt; score 0"
        if r.scorable and r.unfindable:
            note = f"not a UniDet label, never found (as the benchmark): {', '.join(r.unfindable)}"
        return Judgement(SPATIAL, r.score, parts={SPATIAL: r.score}, scorable=r.scorable, note=note)

    def _three_in_one(self, image: Any, prompt: str) -> Judgement:
        from pipeline.scoring.complex import combine_parts

        vqa = self._vqa(image, prompt)
        parts = {BLIP_VQA: vqa.score, SPATIAL: self._spatial(image, prompt, True).score,
                 CLIPSCORE: self._clip(image, prompt, True).score}
        kind, score = combine_parts(prompt, parts)
        return Judgement(THREE_IN_ONE, score, vqa.questions, vqa.answers, parts, True, f"3-in-1 kind: {kind}")

    def format_score(self, name: str, score: float) -> Any:
        return benchmark_answer(name, score, self.cfg.vqa.round_digits)


def benchmark_answer(name: str, score: float, digits: int) -> Any:
    """The answer as the benchmark's vqa_result.json holds it: BLIP-VQA's 4-decimal string, the
    others' (CLIPScore, the spatial rule, 3-in-1) raw float (``schemas.gors``)."""
    return reward_answer(name, score, digits)
