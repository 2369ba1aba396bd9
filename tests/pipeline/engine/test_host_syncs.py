"""No host-device sync inside an engine step (failures are frozen on the device and read every
engine.check_every iterations; caption positions are computed once per batch), and the same numbers as the
per-step host check and the boolean-mask caption indexing it replaced (both kept here, run in this process)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.engine.invert import INJECT_NAN_ENV, InversionEngine, _Batch, _nonfinite, _Slot
from pipeline.referees.blip2 import Referee, TextBatch, caption_token_terms
from tests.pipeline.engine.engine_inputs import color_requests, with_changes
from tests.pipeline.engine.syncs import SyncCounter

# Host-side reads only: Adam's step counter is a CPU tensor (capturable=False); kornia draws its parameters on
# the CPU (pipeline/engine/augment.py ``_params``), so reads of them never wait for the device.
HOST_SIDE = ("torch/optim", "/kornia/", "augment.py:_params")




@pytest.mark.parametrize("batch,chunk", [(1, 0), (3, 5)])
def test_joint_and_tail_steps_read_nothing_from_the_device(generator_models, tiny_cfg, batch, chunk) -> None:
    cfg = with_changes(tiny_cfg, engine__view_chunk=chunk)
    engine = InversionEngine(generator_models, cfg)
    slots = [_Slot(r, r.seed) for r in color_requests(batch)]
    prompts = [s.request.prompt for s in slots]
    text = engine.referee.encode(prompts)
    state = _Batch(engine._initial_latents([s.seed for s in slots]), cfg.optim)
    engine._joint_step(state, slots, prompts, text, 0, 8)  # first step: optimiser state, per-batch indices
    with SyncCounter(HOST_SIDE) as syncs:
        for i in (1, 2):
            engine._joint_step(state, slots, prompts, text, i, 8)
        engine._tail_step(state, slots, prompts, 7, 8)
    assert syncs.total == 0, dict(syncs.where)
    with SyncCounter(HOST_SIDE) as syncs:
        state.read_failures()
    assert syncs.total == 1  # the one read, every engine.check_every iterations


def test_a_run_reads_the_failures_every_check_every_iterations(generator_models, tiny_cfg) -> None:
    cfg = with_changes(tiny_cfg, engine__check_every=3, engine__trace=False)  # 6 + 2 iterations: reads after 3 and 6
    engine = InversionEngine(generator_models, cfg)
    with SyncCounter(HOST_SIDE) as syncs:
        engine.run(color_requests(2))
    reads = sum(n for site, n in syncs.where.items() if site.startswith("tolist invert.py"))
    assert reads == 2 + 1  # + the one in _finish


# ---- the paths this replaced, kept to compare numbers ------------------------------------------------------


def _host_check(self, batch: _Batch, iteration: int, **tensors: torch.Tensor) -> None:
    """The per-step check before: flags to the host (a sync every step), then row by row."""
    names = list(tensors)
    flags = torch.stack([_nonfinite(t) for t in tensors.values()], dim=1).tolist()
    for b, row in enumerate(flags):
        if any(row) and batch.errors[b] is None:
            batch.errors[b] = f"non-finite {names[row.index(True)].replace('_', ' ')} at iteration {iteration}"
            batch.stopped_at[b] = iteration
            batch.alive_rows[b] = False
            with torch.no_grad():
                batch.z[b].zero_()
                batch.ema.value[b].zero_()
                for st in batch.opt.state.values():
                    for t in st.values():
                        if torch.is_tensor(t) and t.shape == batch.z.shape:
                            t[b].zero_()


def _mask_caption_terms(self, caption_hidden: torch.Tensor, text: TextBatch):
    """The caption terms by boolean-mask indexing (a sync forward and one in backward)."""
    text_hidden = caption_hidden[:, self.num_queries : -1]
    valid = text.mask[:, 1:]
    rows = torch.arange(valid.shape[0], device=valid.device)[:, None].expand_as(valid)[valid]
    h = text_hidden[valid].to(self.head.dense.weight.dtype)
    return caption_token_terms(self.head(h), text.ids[:, 1:][valid], self.cfg.label_smoothing), rows


def test_results_equal_the_host_checked_boolean_mask_path(generator_models, tiny_cfg, monkeypatch) -> None:
    cfg = with_changes(tiny_cfg, engine__check_every=4, engine__max_restarts=1, engine__view_chunk=3)
    monkeypatch.setenv(INJECT_NAN_ENV, "p1:2:1")  # p1 fails at iteration 2 on its first attempt, then restarts
    new = InversionEngine(generator_models, cfg).run(color_requests(3))
    monkeypatch.setattr(InversionEngine, "_check", _host_check)
    monkeypatch.setattr(Referee, "_caption_terms", _mask_caption_terms)
    old = InversionEngine(generator_models, cfg).run(color_requests(3))
    assert new[1].restarts and new[1].restarts == old[1].restarts
    for a, b in zip(new, old):
        assert torch.equal(a.image, b.image)
        assert (a.final_losses, a.iterations, a.seed, a.error) == (b.final_losses, b.iterations, b.seed, b.error)


def test_caption_positions_of_a_chunk_are_the_boolean_masks(generator_models, tiny_cfg) -> None:
    referee = Referee(generator_models, tiny_cfg.referee)
    text = referee.encode(["a red car", "a green apple on a wooden table", "a cat"]).repeat_rows(2)
    g = torch.Generator().manual_seed(0)
    for rows in (slice(0, 6), slice(1, 4), slice(5, 6)):
        part = text.select(rows)
        hidden = torch.randn(part.ids.shape[0], referee.num_queries + part.ids.shape[1], 8, generator=g)
        flat, owner = part.caption_index()
        valid = part.mask[:, 1:]
        assert torch.equal(hidden[:, referee.num_queries:-1].flatten(0, 1)[flat],
                           hidden[:, referee.num_queries:-1][valid])
        assert torch.equal(owner, torch.arange(valid.shape[0])[:, None].expand_as(valid)[valid])
    pixels = torch.rand(6, 3, referee.image_size, referee.image_size, generator=g)
    pixels = F.interpolate(pixels, size=referee.image_size)
    dense = referee.caption_token_losses(pixels, text)
    assert dense.shape == text.mask[:, 1:].shape and bool((dense[~text.mask[:, 1:]] == 0).all())
