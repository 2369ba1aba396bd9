"""Several referees in one inversion: their views, losses, gradients and how they are combined.

Each referee of ``zoo.referees`` has its own augmenter (its image size, view count, random stream; the
BLIP-2 entry keeps the paper's stream) and judges only the samples it applies to: a sample whose category
is not in the entry's ``categories``, or whose prompt the referee cannot read (``EncodedPrompts.skipped``),
gets weight 0 from it: no views, no loss, no gradient, and the reason is recorded. Two combinations
(``zoo.balance``; docs/ARCHITECTURE.md "Referee zoo"):

- ``per_referee``: g_r = d(mean over r's views of L_r)/dz per referee, each rescaled per sample to
  share_r x ratio x ||g_sds||, share_r = w_r / (sum of the sample's active weights), then summed. One
  VAE-decoder backward per active referee.
- ``total``: one gradient of sum_r w_r L_r, rescaled per sample to ratio x ||g_sds|| (as one referee is).

With one BLIP-2 entry both are the paper's update, bit for bit (tests/pipeline/engine/test_zoo.py).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from pipeline.config import Config
from pipeline.engine.augment import ViewAugmenter
from pipeline.engine.passes import balance_gradients, view_chunks
from pipeline.referees.base import EncodedPrompts, RefereeContext, ViewLosses, ZooReferee
from pipeline.referees.registry import REFEREE_KINDS, referee_class

GuardFn = Callable[[int], None]  # called with a pass's row count before it runs (the OOM hook)


@dataclass
class ZooText:
    """A batch's prompts as every referee reads them, and who judges which sample."""

    encoded: list[EncodedPrompts]  # per referee
    weights: torch.Tensor  # [R, B] float32: the entry's weight, 0 where it does not judge the sample
    skipped: list[dict[str, str]]  # per sample: referee name -> why it gave weight 0
    # per referee: the indices of the samples it judges, None = all of them (no gather: the paper's exact
    # path); fixed for the optimisation, so found once (no device sync per iteration)
    active: list[list[int] | None]


@dataclass
class ZooLosses:
    """Per-sample losses of one pass: each referee's mean over its views (NaN where it does not judge)."""

    by_name: dict[str, torch.Tensor]  # [B] each
    total: torch.Tensor  # [B] sum of weight x loss over the sample's referees (finite-check, trace)


class RefereeZoo:
    def __init__(self, cfg: Config, models, blip2) -> None:
        self.cfg = cfg
        self.referees: list[ZooReferee] = []
        self.augmenters: list[ViewAugmenter] = []
        self.specs = list(cfg.zoo.referees)
        for spec in self.specs:
            model_id = spec.model or REFEREE_KINDS[spec.kind].default_model
            ref = referee_class(spec.kind)(RefereeContext(cfg, spec, models, blip2, model_id))
            stream = "" if spec.kind == "blip2" else f":{ref.name}"
            self.referees.append(ref)
            self.augmenters.append(ViewAugmenter(copy.deepcopy(cfg.augment), ref.image_size, spec.views, stream,
                                                 resize=None if spec.kind == "blip2" else ref.resize))
        self.names = [r.name for r in self.referees]
        self.max_views = max(a.num_views for a in self.augmenters)

    # ---- text and weights ---------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], categories: Sequence[str | None], device: torch.device) -> ZooText:
        encoded, weights = [], []
        skipped: list[dict[str, str]] = [{} for _ in prompts]
        for ref, spec in zip(self.referees, self.specs):
            enc = ref.encode(prompts)
            row = []
            for b, category in enumerate(categories):
                reason = None  # the category first: it says more than "cannot parse" for a prompt never meant for it
                if spec.categories and category not in spec.categories:
                    reason = f"category {category!r} not in its categories {spec.categories}"
                if reason is None:
                    reason = enc.skipped[b]
                if reason is None and spec.weight == 0:
                    reason = "weight 0"
                if reason is not None:
                    skipped[b][ref.name] = reason
                row.append(0.0 if reason is not None else spec.weight)
            encoded.append(enc)
            weights.append(row)
        active = [None if all(w > 0 for w in row) else [b for b, w in enumerate(row) if w > 0] for row in weights]
        return ZooText(encoded, torch.tensor(weights, dtype=torch.float32, device=device), skipped, active)

    # ---- one referee's views and losses -------------------------------------------------------
    def _losses(self, r: int, pixels: torch.Tensor, rows, guard: GuardFn) -> ViewLosses:
        guard(pixels.shape[0])
        return self.referees[r].losses(pixels, rows)

    def _hardest(self, r: int, views: torch.Tensor, rows, chunk: int, autocast, guard: GuardFn) -> torch.Tensor:
        """The top_k views by this referee's loss (as the single-referee engine picks them)."""
        k, n = self.cfg.augment.top_k, views.shape[1]
        if not 0 < k < n:
            return views
        b = views.shape[0]
        flat, rep = views.detach().flatten(0, 1), rows.repeat_rows(n)
        with torch.no_grad(), autocast():
            scores = torch.cat([self._losses(r, flat[c], rep.select(c), guard).total
                                for c in view_chunks(b * n, chunk)]).view(b, n)
        idx = scores.topk(k, dim=1).indices
        return views[torch.arange(b, device=views.device)[:, None], idx]

    def _views(self, r: int, images: torch.Tensor, idx: list[int] | None, seeds: Sequence[int],
               iteration: int | Sequence[int]) -> torch.Tensor:
        sub = images if idx is None else images[idx]
        sub_seeds = seeds if idx is None else [seeds[i] for i in idx]
        if idx is not None and not isinstance(iteration, int):  # one iteration per sample
            iteration = [iteration[i] for i in idx]
        return self.augmenters[r](sub, sub_seeds, iteration)

    # ---- the combined gradient ----------------------------------------------------------------
    def grad(self, z: torch.Tensor, images: torch.Tensor, text: ZooText, seeds: Sequence[int],
             iteration: int | Sequence[int],
             g_sds: torch.Tensor, ratio: float, chunk: int, autocast: Callable[[], AbstractContextManager],
             guard: GuardFn) -> tuple[torch.Tensor, torch.Tensor, ZooLosses]:
        """(balanced referee gradient, raw gradient, losses) for latents z decoded to ``images``."""
        per_referee = self.cfg.zoo.balance == "per_referee"
        bsz = z.shape[0]
        by_name: dict[str, torch.Tensor] = {}
        outputs, grads, owners = [], [], []
        for r, ref in enumerate(self.referees):
            loss = torch.full((bsz,), math.nan, device=z.device)
            by_name[ref.name] = loss
            idx = text.active[r]
            if idx is not None and not idx:
                continue
            rows = text.encoded[r].rows if idx is None else text.encoded[r].rows.select(idx)
            views = self._hardest(r, self._views(r, images, idx, seeds, iteration), rows, chunk, autocast, guard)
            b, n = views.shape[:2]
            leaf = views.detach().requires_grad_(True)
            rep, owner = rows.repeat_rows(n), torch.arange(b, device=z.device).repeat_interleave(n)
            weight = text.weights[r] if idx is None else text.weights[r][idx]
            sums = torch.zeros(b, device=z.device)
            for c in view_chunks(b * n, chunk):
                with autocast():
                    part = self._losses(r, leaf.flatten(0, 1)[c], rep.select(c), guard)
                scaled = part.total if per_referee else part.total * weight[owner[c]]
                (scaled.sum() / n).backward()
                sums.index_add_(0, owner[c], part.total.detach().float())
            if idx is None:
                loss.copy_(sums / n)
            else:
                loss[idx] = sums / n
            outputs.append(views)
            grads.append(leaf.grad)
            owners.append(r)
        losses = ZooLosses(by_name, _weighted_total(by_name, text.weights))
        if not outputs:  # no referee judges any sample of the batch
            zero = torch.zeros_like(z, dtype=torch.float32)
            return zero, zero.clone(), losses
        if not per_referee:
            g = torch.autograd.grad(outputs, z, grad_outputs=grads)[0].float()
            return balance_gradients(torch.nan_to_num(g), g_sds, ratio), g, losses
        shares = text.weights / text.weights.sum(dim=0).clamp_min(torch.finfo(torch.float32).tiny)
        g_ref = g_raw = None
        for j, (views, grad, r) in enumerate(zip(outputs, grads, owners)):
            (g,) = torch.autograd.grad(views, z, grad_outputs=grad, retain_graph=j + 1 < len(outputs))
            g = g.float()
            part = balance_gradients(torch.nan_to_num(g), g_sds, ratio)
            if len(outputs) > 1:  # one referee: its share is 1 (the paper's update, untouched)
                part = part * shares[r].view(-1, *([1] * (g.dim() - 1)))
            g_ref = part if g_ref is None else g_ref + part
            g_raw = g if g_raw is None else g_raw + g
        return g_ref, g_raw, losses

    # ---- the final image ----------------------------------------------------------------------
    @torch.no_grad()
    def final(self, images: torch.Tensor, text: ZooText) -> tuple[list[dict[str, dict]], ZooLosses, dict]:
        """Per sample {referee name: {kind, score, loss, weight}} for its active referees, the losses,
        and every referee's loss parts ([B], NaN where inactive)."""
        bsz = images.shape[0]
        scores: list[dict[str, dict]] = [{} for _ in range(bsz)]
        by_name, parts = {}, {}
        for r, ref in enumerate(self.referees):
            loss = torch.full((bsz,), math.nan)
            by_name[ref.name] = loss
            idx = text.active[r]
            if idx is not None and not idx:
                continue
            rows = text.encoded[r].rows if idx is None else text.encoded[r].rows.select(idx)
            sub = images if idx is None else images[idx]
            out = ref.losses(self.augmenters[r].plain(sub), rows)
            match = ref.match(out).float().cpu()
            where = range(bsz) if idx is None else idx
            for j, b in enumerate(where):
                loss[b] = float(out.total[j])
                scores[b][ref.name] = {"kind": ref.kind, "score": float(match[j]), "loss": float(out.total[j]),
                                       "weight": float(text.weights[r, b])}
            parts[ref.name] = {k: _scatter(v, idx, bsz) for k, v in out.parts.items()}
        return scores, ZooLosses(by_name, _weighted_total(by_name, text.weights.cpu())), parts


def _weighted_total(by_name: dict[str, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_r w_r L_r per sample over the referees that judge it: a non-finite loss of one of them stays
    non-finite (the engine restarts that sample), a referee that does not judge it adds nothing."""
    total = torch.zeros_like(weights[0])
    for r, loss in enumerate(by_name.values()):
        total = total + torch.where(weights[r] > 0, loss * weights[r], 0.0)
    return total


def _scatter(values: torch.Tensor, idx: list[int] | None, size: int) -> torch.Tensor:
    out = torch.full((size,), math.nan)
    v = values.detach().float().cpu()
    if idx is None:
        return v
    out[idx] = v
    return out
