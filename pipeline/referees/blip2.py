"""BLIP-2 stage-1 losses (ITM + image-grounded captioning) on transformers' BLIP-2 modules.

One vision pass per view, then ONE Q-Former pass holding two copies of every row: the ITM copy
(queries and text see each other, pads masked) and the caption copy (UniLM mask: queries see only
queries; text sees all queries and the text before it; first token replaced by ``[DEC]``). This is
what LAVIS computes with the query pass's cached keys/values, written as a 4D mask, which
``Blip2QFormerModel`` accepts together with ``query_length``.

Every loss is returned per row (one row = one (sample, view) image with its prompt), so several
prompts in one batch stay independent.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.config import RefereeConfig
from pipeline.models.loading import GeneratorModels
from pipeline.referees.base import EncodedPrompts, RefereeContext, ViewLosses, ZooReferee

ITM_MATCH = 1  # index of "match" in the ITM head's two logits
_PROMPT_CACHE_SIZE = 4096  # token-id lists kept (LRU); bounds memory in a long-lived actor


@dataclass
class TextBatch:
    """Token ids (``[CLS] ... [SEP]``, right-padded) and their padding mask, one row per image.

    ``host_mask`` (the mask on the host, when the batch was built there) lets the caption loss find its token
    positions without a device sync: they are computed once per batch (``caption_index``), copied once, and a
    chunk of rows (``select`` with a slice) takes its part of them by host-side offsets. Without it the
    positions come from boolean-mask indexing on the device (a sync per call)."""

    ids: torch.Tensor  # [n, T] long
    mask: torch.Tensor  # [n, T] bool, True on real tokens
    host_mask: torch.Tensor | None = None  # [n, T] bool on the CPU
    _caption: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    _repeated: dict[int, TextBatch] = field(default_factory=dict, repr=False, compare=False)

    def select(self, rows: torch.Tensor | slice | list[int]) -> TextBatch:
        if not isinstance(rows, slice) or self.host_mask is None:
            return TextBatch(self.ids[rows], self.mask[rows])
        out = TextBatch(self.ids[rows], self.mask[rows], self.host_mask[rows])
        start, stop, step = rows.indices(self.ids.shape[0])
        if step == 1:  # the chunk's caption positions: a contiguous run of the batch's (sorted by row)
            flat, owner = self.caption_index()
            a, b = self._offsets()[start], self._offsets()[stop]
            width = self.ids.shape[1] - 1
            out._caption = (flat[a:b] - start * width, owner[a:b] - start)
        return out

    def repeat_rows(self, times: int) -> TextBatch:
        """Each row ``times`` times in a row (sample-major, as views are laid out); built once per ``times``."""
        if times not in self._repeated:
            host = None if self.host_mask is None else self.host_mask.repeat_interleave(times, 0)
            self._repeated[times] = TextBatch(self.ids.repeat_interleave(times, 0),
                                              self.mask.repeat_interleave(times, 0), host)
        return self._repeated[times]

    def to(self, device: torch.device) -> TextBatch:
        host = self.host_mask if self.host_mask is not None else (self.mask if self.mask.device.type == "cpu"
                                                                  else None)
        return TextBatch(self.ids.to(device), self.mask.to(device), host)

    def _offsets(self) -> list[int]:
        """Host ints: where each row's caption positions start in ``caption_index`` (and the total, last)."""
        if "_offsets_list" not in self.__dict__:
            assert self.host_mask is not None
            counts = self.host_mask[:, 1:].sum(dim=1).tolist()  # a host tensor: no device involved
            self.__dict__["_offsets_list"] = [0, *itertools.accumulate(counts)]
        return self.__dict__["_offsets_list"]

    def caption_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat positions in [n, T-1], row of each) of the real next tokens, row-major, on the ids' device."""
        if self._caption is None:
            valid = (self.host_mask if self.host_mask is not None else self.mask)[:, 1:]
            flat = valid.reshape(-1).nonzero().squeeze(1)
            both = torch.stack([flat, flat // valid.shape[1]]).to(self.ids.device)  # one copy per batch
            self._caption = (both[0], both[1])
        return self._caption


@dataclass
class RefereeLosses:
    """Per-row losses, float32, shape [n]."""

    itm: torch.Tensor
    caption: torch.Tensor
    total: torch.Tensor

    @property
    def match_probability(self) -> torch.Tensor:
        return torch.exp(-self.itm)


def unilm_mask(text_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Boolean [n, 1, Q+T, Q+T] mask (True = may attend) for image-grounded captioning."""
    n, t = text_mask.shape
    length = num_queries + t
    allowed = torch.zeros(n, length, length, dtype=torch.bool, device=text_mask.device)
    allowed[:, :, :num_queries] = True  # everyone sees the queries; queries see nothing else
    causal = torch.ones(t, t, dtype=torch.bool, device=text_mask.device).tril()
    allowed[:, num_queries:, num_queries:] = causal & text_mask[:, None, :]
    return allowed[:, None]


def bidirectional_mask(text_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Boolean [n, 1, Q+T, Q+T] mask for ITM: every position sees every query and real token."""
    n, t = text_mask.shape
    queries = torch.ones(n, num_queries, dtype=torch.bool, device=text_mask.device)
    keys = torch.cat([queries, text_mask], dim=1)
    return keys[:, None, None, :].expand(n, 1, num_queries + t, num_queries + t)


def as_attention_mask(allowed: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """SDPA takes the boolean mask; eager attention adds its mask to the scores."""
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return allowed


def caption_token_terms(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float
) -> torch.Tensor:
    """Label-smoothed cross-entropy of each predicted token (logits [M, V], targets [M])."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing, reduction="none")


class Referee:
    """The frozen BLIP-2 referee: text preparation (cached) and per-row losses."""

    def __init__(self, models: GeneratorModels, cfg: RefereeConfig) -> None:
        self.model = models.referee
        self.head = models.caption_head
        self.tokenizer = models.referee_tokenizer
        self.cfg = cfg
        self.device = models.device
        self.image_size: int = self.model.config.vision_config.image_size
        self.num_queries: int = self.model.config.num_query_tokens
        self.bos_id: int = self.tokenizer.bos_token_id
        self.pad_id: int = self.tokenizer.pad_token_id
        self._strip = re.compile("[" + re.escape(cfg.strip_chars) + "]") if cfg.strip_chars else None
        self._ids = functools.lru_cache(maxsize=_PROMPT_CACHE_SIZE)(self._tokenize)  # bounded: endless prompts

    # ---- text -------------------------------------------------------------------------------
    def clean(self, text: str) -> str:
        """LAVIS's caption pre-processing: lower case, listed characters to spaces, one space."""
        text = text.lower()
        if self._strip is not None:
            text = self._strip.sub(" ", text)
        return " ".join(text.split())

    def token_ids(self, prompt: str) -> list[int]:
        """``[CLS] ... [SEP]`` ids of a prompt, at most ``max_tokens``; computed once per prompt."""
        return self._ids(prompt)

    def _tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer(self.clean(prompt), truncation=True, max_length=self.cfg.max_tokens).input_ids

    def encode(self, prompts: Sequence[str]) -> TextBatch:
        """Ids of several prompts, padded to the longest of them (padding per batch)."""
        rows = [self.token_ids(p) for p in prompts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
        return TextBatch(ids, mask).to(self.device)

    # ---- model passes -----------------------------------------------------------------------
    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """ln_vision(ViT(pixels)): transformers applies ``post_layernorm`` to every token."""
        return self.model.vision_model(pixel_values=pixels).last_hidden_state

    def qformer_hidden(
        self, image_embeds: torch.Tensor, ids: torch.Tensor, allowed: torch.Tensor
    ) -> torch.Tensor:
        """Q-Former over [queries; text] with a boolean [n, 1, L, L] mask -> [n, L, H]."""
        n = ids.shape[0]
        queries = self.model.query_tokens.expand(n, -1, -1)
        embeds = self.model.embeddings(input_ids=ids, query_embeds=queries)
        qformer = self.model.qformer
        mask = as_attention_mask(allowed, qformer.config._attn_implementation, qformer.layernorm.weight.dtype)
        out = qformer(
            query_embeds=embeds,
            query_length=self.num_queries,
            attention_mask=mask,
            encoder_hidden_states=image_embeds,
        )
        return out.last_hidden_state

    def _joint_hidden(self, image_embeds: torch.Tensor, text: TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """One Q-Former pass for both losses: rows [0, n) are ITM, rows [n, 2n) captioning."""
        n = text.ids.shape[0]
        dec_ids = text.ids.clone()
        dec_ids[:, 0] = self.bos_id
        ids = torch.cat([text.ids, dec_ids])
        allowed = torch.cat(
            [bidirectional_mask(text.mask, self.num_queries), unilm_mask(text.mask, self.num_queries)]
        )
        hidden = self.qformer_hidden(image_embeds.repeat(2, 1, 1), ids, allowed)
        return hidden[:n], hidden[n:]

    def _itm_logits(self, itm_hidden: torch.Tensor) -> torch.Tensor:
        q = itm_hidden[:, : self.num_queries].to(self.model.itm_head.weight.dtype)
        return self.model.itm_head(q).mean(dim=1).float()

    def _itm_loss(self, itm_hidden: torch.Tensor) -> torch.Tensor:
        return -F.log_softmax(self._itm_logits(itm_hidden), dim=-1)[:, ITM_MATCH]

    def _caption_terms(self, caption_hidden: torch.Tensor, text: TextBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token caption losses of the real next tokens, and the row each belongs to.

        Position t predicts token t+1; only positions whose target is a real token count (pads
        are ignored, as LAVIS's -100 labels), so the head runs on those positions only.
        """
        text_hidden = caption_hidden[:, self.num_queries : -1]
        # Gathers at precomputed positions (the same rows, in the same order, as boolean-mask indexing): no
        # data-dependent shape, so no device sync here nor in backward.
        flat, rows = text.caption_index()
        h = text_hidden.flatten(0, 1).index_select(0, flat).to(self.head.dense.weight.dtype)
        targets = text.ids[:, 1:].flatten().index_select(0, flat)
        terms = caption_token_terms(self.head(h), targets, self.cfg.label_smoothing)
        return terms, rows

    def losses(self, pixels: torch.Tensor, text: TextBatch) -> RefereeLosses:
        """Per-row ITM and caption losses of CLIP-normalised images [n, 3, S, S] with their text."""
        itm_hidden, caption_hidden = self._joint_hidden(self.image_embeds(pixels), text)
        itm = self._itm_loss(itm_hidden)
        terms, rows = self._caption_terms(caption_hidden, text)
        n = text.ids.shape[0]
        sums = torch.zeros(n, device=terms.device, dtype=terms.dtype).index_add(0, rows, terms)
        counts = text.mask[:, 1:].sum(dim=1).clamp_min(1)
        caption = sums / counts
        total = self.cfg.itm_weight * itm + self.cfg.caption_weight * caption
        return RefereeLosses(itm=itm, caption=caption, total=total)

    def caption_token_losses(self, pixels: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """Dense [n, T-1] matrix of per-position caption terms (0 where the target is a pad)."""
        _, caption_hidden = self._joint_hidden(self.image_embeds(pixels), text)
        terms, _ = self._caption_terms(caption_hidden, text)
        flat, _ = text.caption_index()
        dense = torch.zeros(text.mask[:, 1:].shape, device=terms.device, dtype=terms.dtype)
        return dense.view(-1).index_copy(0, flat, terms).view(dense.shape)

    # ---- raw outputs (what tests/parity compares with the original code) ------------------------
    def itm_logits(self, pixels: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """[n, 2] ITM logits (no match, match): the ITM head averaged over the query outputs."""
        itm_hidden, _ = self._joint_hidden(self.image_embeds(pixels), text)
        return self._itm_logits(itm_hidden)

    def caption_logits(self, pixels: torch.Tensor, text: TextBatch) -> torch.Tensor:
        """[n, T, vocab] LM-head logits at every text position (position t predicts token t+1)."""
        _, caption_hidden = self._joint_hidden(self.image_embeds(pixels), text)
        text_hidden = caption_hidden[:, self.num_queries :].to(self.head.dense.weight.dtype)
        return self.head(text_hidden).float()


class Blip2Referee(ZooReferee):
    """BLIP-2 ITM + caption as a zoo referee: the engine's ``Referee``, numbers unchanged."""

    kind = "blip2"

    def __init__(self, ctx: RefereeContext) -> None:
        super().__init__(ctx)
        self.referee: Referee = ctx.blip2
        self.image_size = self.referee.image_size
        self.source = ctx.models.sources.get("referee", "")

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        return EncodedPrompts(self.referee.encode(prompts), [None] * len(prompts))

    def losses(self, pixels: torch.Tensor, rows: TextBatch) -> ViewLosses:
        out = self.referee.losses(pixels, rows)
        return ViewLosses(out.total, {"itm": out.itm, "caption": out.caption})

    def match(self, losses: ViewLosses) -> torch.Tensor:
        return torch.exp(-losses.parts["itm"])  # the ITM head's match probability
