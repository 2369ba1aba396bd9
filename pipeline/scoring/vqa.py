"""BLIP-VQA scoring exactly as T2I-CompBench computes it, on transformers' BlipForQuestionAnswering.

Per (image, question): the question's first token ([CLS]) is replaced by ``[ENC]`` (BLIP's
image-grounded encoder token, which transformers' BLIP does not set), the text encoder attends
to the image, the answer decoder is started from ``[DEC]`` and the answer is
p(yes) / (p(yes) + p(no)) from the first step's softmax over the whole vocabulary. Answers are
rounded to 4 decimals and multiplied into the image score (empty question slots count 1), which
is rounded to 4 decimals too, as the benchmark writes it.

The image path (resize, CLIP normalisation, the three networks) is plain differentiable torch:
``answer_probs`` keeps the graph, ``score`` runs it under ``no_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.models.loading import VqaModels
from pipeline.scoring.questions import questions_for, spacy_model_info, warn_spacy_version
from pipeline.scoring.scorer_record import deviations, make_record, model_set


@dataclass
class VqaResult:
    questions: list[str]
    answers: list[float]
    score: float


# --- the protocol's arithmetic, kept pure so it can be tested on hand-made logits -------------


def yes_ratio(logits: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    """p(yes) / (p(yes) + p(no)) from first-step logits ``[N, vocab]`` (softmax over all tokens)."""
    probs = torch.softmax(logits.float(), dim=-1)  # float32: bf16 softmax loses the 4th decimal
    p_yes, p_no = probs[:, yes_id], probs[:, no_id]
    ratio = p_yes / (p_yes + p_no)
    # Both probabilities can underflow to 0 (0/0); the same ratio in logit form is then exact enough.
    fallback = torch.sigmoid(logits[:, yes_id].float() - logits[:, no_id].float())
    return torch.where(p_yes + p_no > 0, ratio, fallback)


def round_answer(p: float, digits: int) -> float:
    """The benchmark writes each answer as ``'{:.4f}'.format(p)`` and reads it back with float()."""
    return float(f"{p:.{digits}f}")


def combine(answers: list[float], digits: int) -> float:
    """The image score: product of the rounded answers (empty slots are 1), itself rounded.

    float32 and left to right, as the benchmark's torch reward tensor, then written with
    ``'{:.4f}'``: that 4-decimal value is what vqa_result.json holds and what GORS thresholds."""
    acc = np.float32(1.0)
    for a in answers:
        acc = np.float32(acc * np.float32(a))
    return round_answer(float(acc), digits)


def format_score(score: float, digits: int) -> str:
    """The string T2I-CompBench writes in ``vqa_result.json``."""
    return f"{score:.{digits}f}"


# --- token ids, looked up (never hard-coded) -----------------------------------------------------


def _token_id(tokenizer: Any, token: str, vocab_size: int, add_as: str | None = None) -> int:
    if token not in tokenizer.get_vocab() and add_as is not None:
        # BLIP's init_tokenizer adds [DEC] (bos) then [ENC] to bert-base-uncased; hub tokenizers
        # may lack [ENC]. Adding it in the same order gives BLIP's id (30523 on the real vocab).
        tokenizer.add_special_tokens({add_as: token if add_as == "bos_token" else [token]})
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id or ids[0] >= vocab_size:
        raise UserError(
            f"the BLIP-VQA tokenizer has no single token {token!r} inside the model's vocabulary "
            f"({vocab_size}); use a BLIP tokenizer (bert-base-uncased plus [DEC] and [ENC])"
        )
    return ids[0]


@dataclass(frozen=True)
class SpecialIds:
    enc: int
    dec: int
    yes: int
    no: int

    @classmethod
    def lookup(cls, tokenizer: Any, vocab_size: int) -> SpecialIds:
        return cls(
            dec=_token_id(tokenizer, "[DEC]", vocab_size, add_as="bos_token"),
            enc=_token_id(tokenizer, "[ENC]", vocab_size, add_as="additional_special_tokens"),
            yes=_token_id(tokenizer, "yes", vocab_size),
            no=_token_id(tokenizer, "no", vocab_size),
        )


# --- the scorer ----------------------------------------------------------------------------------


def _force_vision_eps(model: Any, eps: float) -> float:
    """Set every vision LayerNorm to BLIP's eps (the hub config says 1e-5); returns the loaded one."""
    norms = [m for m in model.vision_model.modules() if isinstance(m, torch.nn.LayerNorm)]
    loaded = float(norms[0].eps) if norms else eps
    for norm in norms:
        norm.eps = eps
    return loaded


class VqaScorer:
    """Scores images against prompts with the T2I-CompBench BLIP-VQA protocol."""

    def __init__(self, models: VqaModels, cfg: Config) -> None:
        self.models = models
        self.cfg = cfg
        self.vcfg = cfg.vqa
        model = models.model
        vocab = model.text_encoder.embeddings.word_embeddings.num_embeddings
        self.ids = SpecialIds.lookup(models.tokenizer, vocab)
        self.model_image_size = int(model.config.vision_config.image_size)
        # The hub weights were resized to 384; the protocol's 480 needs interpolated positions.
        self.pos_interpolated = self.model_image_size != self.vcfg.image_size
        loaded_eps = _force_vision_eps(model, self.vcfg.vision_layer_norm_eps)
        dev, dt = models.device, torch.float32
        # The scorer's own constants (vqa.image_*), never the referee's augment.clip_*.
        self._mean = torch.tensor(self.vcfg.image_mean, device=dev, dtype=dt).view(1, 3, 1, 1)
        self._std = torch.tensor(self.vcfg.image_std, device=dev, dtype=dt).view(1, 3, 1, 1)
        # The version warning matters for real weights only (the driver says it too, as tiny/small skip it).
        spacy = spacy_model_info(self.vcfg.spacy_model) if model_set(cfg) else warn_spacy_version(self.vcfg)
        vision = {"image_size": self.model_image_size, "layer_norm_eps": loaded_eps}
        self.record = make_record(cfg, models.source, spacy, deviations(cfg, spacy, vision, model_set(cfg)))
        self.metadata: dict[str, Any] = {
            "model_source": models.source,
            "model_image_size": self.model_image_size,
            "protocol_image_size": self.vcfg.image_size,
            "pos_interpolated": self.pos_interpolated,
            "token_ids": {"enc": self.ids.enc, "dec": self.ids.dec, "yes": self.ids.yes, "no": self.ids.no},
            **self.record,
        }
        if self.pos_interpolated:
            self.metadata["caveat"] = (
                f"position embeddings interpolated from {self.model_image_size} to {self.vcfg.image_size} px; "
                "scores approximate the benchmark's (convert the original 480 px checkpoint for exact scores)"
            )

    # -- image path (differentiable) --

    def preprocess(self, images: list[torch.Tensor]) -> torch.Tensor:
        """3xHxW images in [0, 1] -> ``[B, 3, S, S]`` CLIP-normalised, bicubic-resized pixels."""
        size = self.vcfg.image_size
        out = []
        for img in images:
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"expected an image tensor of shape 3xHxW, got {tuple(img.shape)}")
            x = img.to(self.models.device, torch.float32).unsqueeze(0)
            if x.shape[-2:] != (size, size):
                # antialias + clamp: what PIL's bicubic resize (the benchmark's) does when shrinking.
                x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
                x = x.clamp(0.0, 1.0)
            out.append(x)
        return (torch.cat(out) - self._mean) / self._std

    def load_pil(self, image: Any) -> torch.Tensor:
        """A PIL image resized exactly as the benchmark does (PIL bicubic on 8-bit RGB), as 3xSxS in [0, 1].

        For files (the score job) this reproduces torchvision's ``Resize`` on PIL bit for bit;
        ``preprocess`` then only normalises."""
        from PIL import Image

        size = self.vcfg.image_size
        rgb = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        vision = self.models.model.vision_model
        pixels = pixels.to(torch.float32)  # the scorer runs in float32 whatever models.dtype says
        return vision(pixel_values=pixels, interpolate_pos_encoding=self.pos_interpolated).last_hidden_state

    # -- text path --

    def _question_ids(self, questions: list[str]) -> list[list[int]]:
        """Unpadded token ids per question, first token replaced by [ENC]."""
        if not questions:
            return []
        ids = self.models.tokenizer(questions, truncation=True, max_length=self.vcfg.max_question_tokens).input_ids
        # BLIP: image-grounded encoding starts with [ENC], not [CLS]
        return [[self.ids.enc, *row[1:]] for row in ids]

    def _pair_probs(self, embeds: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Answers for (image embeddings ``[P, L, D]``, question ids ``[P, T]``) pairs, unpadded."""
        model = self.models.model
        mask = torch.ones_like(ids)
        image_mask = torch.ones(embeds.shape[:-1], dtype=torch.long, device=embeds.device)
        states = model.text_encoder(
            input_ids=ids, attention_mask=mask, encoder_hidden_states=embeds, encoder_attention_mask=image_mask,
        ).last_hidden_state
        start = torch.full((ids.shape[0], 1), self.ids.dec, dtype=torch.long, device=ids.device)
        logits = model.text_decoder(
            input_ids=start, encoder_hidden_states=states, encoder_attention_mask=mask, use_cache=False,
        ).logits[:, 0, :]
        return yes_ratio(logits, self.ids.yes, self.ids.no)

    def _length_batches(self, ids: list[list[int]]) -> list[list[int]]:
        """Pair indices grouped by question length, then cut to vqa.batch_size.

        Why: transformers' BLIP text layers drop the decoder's cross-attention mask (5.x), so a padded
        question would let [DEC] attend to pad states. Batches of equal length need no padding and
        give what BLIP's masked attention gives."""
        by_len: dict[int, list[int]] = {}
        for k, row in enumerate(ids):
            by_len.setdefault(len(row), []).append(k)
        step = self.vcfg.batch_size
        return [group[s : s + step] for _, group in sorted(by_len.items()) for s in range(0, len(group), step)]

    def _all_image_embeds(self, images: list[torch.Tensor], which: list[int]) -> dict[int, torch.Tensor]:
        """Vision embeddings of ``images[i]`` for i in ``which``: one vision pass per image."""
        embeds: dict[int, torch.Tensor] = {}
        step = self.vcfg.image_batch_size
        for start in range(0, len(which), step):
            chunk = which[start : start + step]
            out = self.image_embeds(self.preprocess([images[i] for i in chunk]))
            embeds.update({i: out[j] for j, i in enumerate(chunk)})
        return embeds

    def answer_probs(self, images: list[torch.Tensor], questions: list[list[str]]) -> list[torch.Tensor]:
        """Unrounded answers per image (a tensor per image, empty when it has no questions).

        The vision encoder runs once per image; its embeddings are repeated per question. Keeps the
        autograd graph (no ``no_grad`` here) so the scorer can serve as a differentiable referee.
        """
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} question lists")
        embeds = self._all_image_embeds(images, [i for i, q in enumerate(questions) if q])
        pair_image = [i for i, q in enumerate(questions) for _ in q]
        ids = self._question_ids([x for q in questions for x in q])
        order: list[int] = []
        probs: list[torch.Tensor] = []
        for batch in self._length_batches(ids):
            batch_ids = torch.tensor([ids[k] for k in batch], dtype=torch.long, device=self.models.device)
            probs.append(self._pair_probs(torch.stack([embeds[pair_image[k]] for k in batch]), batch_ids))
            order += batch
        flat = torch.cat(probs) if probs else torch.zeros(0, device=self.models.device)
        # back to (image, question) order: position of pair k in ``order``
        flat = flat[torch.argsort(torch.tensor(order, dtype=torch.long, device=flat.device))] if order else flat
        return list(torch.split(flat, [len(q) for q in questions]))

    # -- the job-facing API --

    def questions(self, prompts: list[str]) -> list[list[str]]:
        return [questions_for(p, self.vcfg) for p in prompts]

    def score(self, images: list[torch.Tensor], prompts: list[str]) -> list[VqaResult]:
        """One result per (image, prompt); a prompt with no questions scores 1.0."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        questions = self.questions(prompts)
        with torch.no_grad():
            probs = self.answer_probs(images, questions)
        return [self._result(q, p) for q, p in zip(questions, probs)]

    def score_stored(self, images: list[Any], prompts: list[str]) -> list[VqaResult]:
        """Scores of images as stored (PIL images, e.g. decoded from a tar's bytes), resized as the
        benchmark does. One image per pass: a score then depends on nothing else in the batch, so
        the run's stored score and ``jobs/score.py``'s agree to the last digit."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return [self.score([self.load_pil(image)], [prompt])[0] for image, prompt in zip(images, prompts)]

    def _result(self, questions: list[str], probs: torch.Tensor) -> VqaResult:
        answers = [round_answer(p, self.vcfg.round_digits) for p in probs.tolist()]
        return VqaResult(questions=questions, answers=answers, score=combine(answers, self.vcfg.round_digits))
