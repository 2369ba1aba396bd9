"""A straightforward per-prompt reference loop: what the engine is measured against.

It runs Algorithm 1 the way the authors' code (Pepper-lll/VLMinv, ``blip2_sds.py``) runs it: one
prompt at a time, all of its views in one referee batch, float32 (no autocast), one autograd pass
from the mean view loss back to z, built from this project's own pieces (``Referee``,
``ViewAugmenter``, ``SdsGuidance``) and the same per-sample random streams as the engine.

Two styles:

- ``authors``: also what that code computes besides Algorithm 1's math, all of it compute the
  engine leaves out: the referee text padded to ``max_tokens`` (``padding="max_length"``); a
  no-grad referee pass over every view for the top-k pick, run whenever there is more than one
  view (even when k = N); a VAE decode of the EMA latents every iteration; and a decode of the
  updated z after each step (for its logging). Its periodic BLIP-VQA logging is left out.
- ``plain``: Algorithm 1 only, as the engine computes it, but one prompt at a time and without
  the engine's view chunking, restarts or batching: it isolates what batching alone buys.

Both draw from the engine's per-sample random streams, but the images are not meant to match
the engine's bit for bit (the authors' style pads the text, which changes the caption loss) and
nothing checks them: this is a timing baseline, not a second implementation to trust.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pipeline.config import Config
from pipeline.engine.augment import ViewAugmenter
from pipeline.engine.invert import LatentEma, SampleRequest, balance_gradients, learning_rate
from pipeline.engine.rng import generator
from pipeline.engine.sds import SdsGuidance
from pipeline.models.loading import GeneratorModels
from pipeline.referees.blip2 import Referee, TextBatch

STYLES = ("authors", "plain")


class ReferenceLoop:
    def __init__(
        self, models: GeneratorModels, cfg: Config, style: str = "authors",
        on_step: Callable[[int, str], None] | None = None,
    ) -> None:
        """``on_step(iteration, phase)`` is called after every iteration ("joint" or "tail"): a timing hook."""
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        self.models, self.cfg, self.style = models, cfg, style
        self.on_step = on_step
        self.device = models.device
        self.referee = Referee(models, cfg.referee)
        self.sds = SdsGuidance(models, cfg.sds)
        self.augmenter = ViewAugmenter(cfg.augment, self.referee.image_size)

    def _text(self, prompt: str) -> TextBatch:
        if self.style == "plain":
            return self.referee.encode([prompt])
        ids = self.referee.token_ids(prompt)  # padded to max_tokens, as padding="max_length"
        width = self.cfg.referee.max_tokens
        padded = torch.full((1, width), self.referee.pad_id, dtype=torch.long)
        padded[0, : len(ids)] = torch.tensor(ids)
        mask = torch.zeros(1, width, dtype=torch.bool)
        mask[0, : len(ids)] = True
        return TextBatch(padded, mask).to(self.device)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        x = self.models.vae.decode(z / self.cfg.latent.scale).sample
        return (x / 2 + 0.5).clamp(0, 1)

    def _noise(self, z: torch.Tensor, seed: int, stream: str, i: int) -> torch.Tensor:
        return torch.randn(z.shape, generator=generator(seed, stream, i, device=z.device), device=z.device)

    def run(self, requests: Sequence[SampleRequest]) -> list[torch.Tensor]:
        return [self.run_one(r) for r in requests]

    def run_one(self, req: SampleRequest) -> torch.Tensor:
        cfg, ocfg = self.cfg, self.cfg.optim
        lc = cfg.latent
        seed = req.seed
        text = self._text(req.prompt)
        z = torch.randn((1, lc.channels, lc.size, lc.size), generator=generator(seed, "latent-init"))
        z = z.to(self.device).requires_grad_(True)
        opt = torch.optim.Adam([z], lr=ocfg.lr_start, betas=tuple(ocfg.betas), weight_decay=ocfg.weight_decay)
        ema = LatentEma(z, ocfg.ema_decay)
        total = ocfg.iterations + ocfg.tail_iterations
        n, k = cfg.augment.num_views, cfg.augment.top_k
        for i in range(total):
            w = self.sds.weight(i, total)
            g_sds = self.sds.grad(z, [req.prompt], [seed], i, w)
            if i >= ocfg.iterations:
                with torch.no_grad():
                    z.sub_(ocfg.sds_step * g_sds + ocfg.tail_noise_std * self._noise(z, seed, "tail-noise", i))
                if self.on_step is not None:
                    self.on_step(i, "tail")
                continue
            images = self._decode(z)
            if self.style == "authors":
                with torch.no_grad():
                    self._decode(ema.value)  # the authors' per-iteration EMA decode
            views = self.augmenter(images, [seed], i)[0]  # [N, 3, S, S]
            rows = text.repeat_rows(n)
            select = (n > 1) if self.style == "authors" else (0 < k < n)
            if select:
                with torch.no_grad():
                    losses = self.referee.losses(views, rows).total
                kept = k if 0 < k < n else n
                idx = losses.topk(kept).indices
                views, rows = views[idx], rows.select(idx)
            loss = self.referee.losses(views, rows).total.mean()
            (g_raw,) = torch.autograd.grad(loss, z)
            g_ref = balance_gradients(torch.nan_to_num(g_raw), g_sds, ocfg.ref_to_sds_ratio)
            for group in opt.param_groups:
                group["lr"] = learning_rate(ocfg, i)
            z.grad = g_ref + ocfg.noise_std * self._noise(z, seed, "grad-noise", i)
            opt.step()
            with torch.no_grad():
                z.sub_(ocfg.sds_step * g_sds)
                z.add_(ocfg.noise_std * self._noise(z, seed, "z-noise", i))
            ema.update(z)
            if i + 1 in ocfg.ema_restarts:
                ema.restart(z)
            if self.style == "authors":
                with torch.no_grad():
                    self._decode(z)  # the authors' decode after the step (for logging)
            if self.on_step is not None:
                self.on_step(i, "joint")
        with torch.no_grad():
            image = self._decode(z.detach())
            self.referee.losses(self.augmenter.plain(image), text)  # the final ITM score, as the engine
        return image[0].float().cpu()
