"""BLIP-2 referee losses on the tiny model, checked against straightforward references."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.referees.blip2 import Referee, TextBatch, unilm_mask

# Float results that depend on the CPU's kernels: `make test-numerics` runs them on other kernel paths.
pytestmark = pytest.mark.numerics

PROMPTS = ["a red car", "a blue cube and a green bowl on the table"]


@pytest.fixture(scope="module")
def referee(generator_models, tiny_cfg) -> Referee:
    return Referee(generator_models, tiny_cfg.referee)


def _with(referee: Referee, generator_models, **changes) -> Referee:
    return Referee(generator_models, dataclasses.replace(referee.cfg, **changes))


def _pixels(referee: Referee, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, referee.image_size, referee.image_size, generator=g)


def _loop_unilm_additive(text_mask: torch.Tensor, q: int) -> torch.Tensor:
    """The caption mask built position by position, as an additive float mask."""
    n, t = text_mask.shape
    mask = torch.full((n, 1, q + t, q + t), torch.finfo(torch.float32).min)
    for b in range(n):
        for i in range(q + t):
            for j in range(q + t):
                query_key = j < q
                earlier_real_text = i >= q and j >= q and j <= i and bool(text_mask[b, j - q])
                if query_key or earlier_real_text:
                    mask[b, 0, i, j] = 0.0
    return mask


def _reference_caption_terms(referee: Referee, pixels: torch.Tensor, text: TextBatch, eps: float) -> torch.Tensor:
    """LAVIS's captioning loss written out: [DEC] first, loop mask, explicit smoothed CE per token.

    Returns the [n, T-1] matrix of per-position terms (0 where the target is a pad).
    """
    model, q = referee.model, referee.num_queries
    ids = text.ids.clone()
    ids[:, 0] = referee.tokenizer.convert_tokens_to_ids("[DEC]")
    image = model.vision_model(pixel_values=pixels).last_hidden_state
    embeds = model.embeddings(input_ids=ids, query_embeds=model.query_tokens.expand(ids.shape[0], -1, -1))
    hidden = model.qformer(
        query_embeds=embeds, query_length=q, attention_mask=_loop_unilm_additive(text.mask, q),
        encoder_hidden_states=image,
    ).last_hidden_state
    terms = torch.zeros(ids.shape[0], ids.shape[1] - 1)
    for b in range(ids.shape[0]):
        for pos in range(ids.shape[1] - 1):
            if not text.mask[b, pos + 1]:
                continue  # the target is a pad: ignored
            logp = F.log_softmax(referee.head(hidden[b, q + pos]), dim=-1)
            target = int(ids[b, pos + 1])
            terms[b, pos] = (1 - eps) * -logp[target] + eps * -logp.mean()
    return terms


@torch.no_grad()
def test_caption_loss_equals_reference_computation(referee) -> None:
    text = referee.encode(PROMPTS)
    assert text.mask.sum(1).tolist()[0] < text.mask.sum(1).tolist()[1]  # one row is padded
    pixels = _pixels(referee, 2)
    want = _reference_caption_terms(referee, pixels, text, referee.cfg.label_smoothing)
    # Two summation orders of the same float32 terms (losses ~5): measured <= 9.6e-7 over ATen AVX512 / AVX2 /
    # default and 1 and 2 threads; a wrong mask, shift or smoothing moves them by more than 1e-3.
    torch.testing.assert_close(referee.caption_token_losses(pixels, text), want, rtol=0, atol=1e-5)
    mean = want.sum(1) / text.mask[:, 1:].sum(1)
    torch.testing.assert_close(referee.losses(pixels, text).caption, mean, rtol=0, atol=1e-5)


@torch.no_grad()
def test_itm_equals_transformers_forward(referee) -> None:
    text = referee.encode(PROMPTS)
    pixels = _pixels(referee, 2, seed=1)
    out = referee.model(pixels, text.ids, text.mask.long(), use_image_text_matching_head=True)
    want = -F.log_softmax(out.logits_per_image, dim=-1)[:, 1]
    torch.testing.assert_close(referee.losses(pixels, text).itm, want, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_later_text_does_not_change_earlier_terms(referee) -> None:
    text = referee.encode(["a red car near the table"])
    last = int(text.mask.sum()) - 2  # the last real word (before [SEP])
    other = text.ids.clone()
    other[0, last] = referee.tokenizer.convert_tokens_to_ids("dog")
    assert not torch.equal(other, text.ids)
    pixels = _pixels(referee, 1, seed=2)
    a = referee.caption_token_losses(pixels, text)[0]
    b = referee.caption_token_losses(pixels, TextBatch(other, text.mask))[0]
    # Term p predicts token p+1: terms before the changed token's own prediction are untouched.
    torch.testing.assert_close(a[: last - 1], b[: last - 1], rtol=0, atol=1e-6)
    assert not torch.allclose(a[last - 1], b[last - 1])


@torch.no_grad()
def test_query_outputs_do_not_depend_on_text(referee) -> None:
    pixels = _pixels(referee, 1, seed=3)
    image = referee.image_embeds(pixels)
    q = referee.num_queries
    outs = []
    for prompt in ["a red car", "green bowl on a wooden chair with a cat"]:
        text = referee.encode([prompt])
        outs.append(referee.qformer_hidden(image, text.ids, unilm_mask(text.mask, q))[:, :q])
    alone = referee.model.qformer(
        query_embeds=referee.model.query_tokens, encoder_hidden_states=image
    ).last_hidden_state
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(outs[0], alone, rtol=0, atol=1e-5)


@torch.no_grad()
def test_label_smoothing_is_applied_by_the_formula(referee, generator_models) -> None:
    text = referee.encode(PROMPTS)
    pixels = _pixels(referee, 2, seed=4)
    loss = {eps: _with(referee, generator_models, label_smoothing=eps).losses(pixels, text).caption
            for eps in (0.0, 0.1, 1.0)}
    assert referee.cfg.label_smoothing == pytest.approx(0.1)
    torch.testing.assert_close(referee.losses(pixels, text).caption, loss[0.1])
    # Smoothing eps mixes the NLL (eps = 0) with the uniform-target CE (eps = 1).
    torch.testing.assert_close(loss[0.1], 0.9 * loss[0.0] + 0.1 * loss[1.0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(loss[0.1], loss[0.0])


@torch.no_grad()
def test_pads_do_not_count(referee) -> None:
    pixels = _pixels(referee, 2, seed=5)
    alone = referee.losses(pixels[:1], referee.encode(PROMPTS[:1]))
    padded_text = referee.encode(PROMPTS)
    padded = referee.losses(pixels, padded_text)
    torch.testing.assert_close(padded.caption[:1], alone.caption, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded.itm[:1], alone.itm, rtol=1e-5, atol=1e-5)
    terms = referee.caption_token_losses(pixels, padded_text)
    real = padded_text.mask[:, 1:]
    assert torch.all(terms[~real] == 0)
    torch.testing.assert_close(padded.caption, terms.sum(1) / real.sum(1), rtol=1e-6, atol=1e-6)


def test_total_weights_and_per_row_independence(referee, generator_models) -> None:
    text = referee.encode(PROMPTS)
    pixels = _pixels(referee, 2, seed=6).requires_grad_(True)
    weighted = _with(referee, generator_models, itm_weight=2.0, caption_weight=0.5)
    out = weighted.losses(pixels, text)
    torch.testing.assert_close(out.total, 2.0 * out.itm + 0.5 * out.caption)
    out.total[0].backward()  # row 0's loss reaches row 0's image only
    assert pixels.grad[0].abs().sum() > 0 and pixels.grad[1].abs().sum() == 0
    assert torch.all(out.match_probability > 0) and torch.all(out.match_probability < 1)


def test_text_is_cleaned_truncated_and_cached(referee, monkeypatch) -> None:
    assert referee.clean('A Red (car)!  on: the;"table"~ #1*') == "a red car on the table 1"
    long_prompt = " ".join(["red"] * 100)
    ids = referee.token_ids(long_prompt)
    tok = referee.tokenizer
    assert len(ids) == referee.cfg.max_tokens and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    calls = []
    real = referee.tokenizer.__call__

    class Counting:
        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, *args, **kwargs):
            calls.append(args)
            return real(*args, **kwargs)

    monkeypatch.setattr(referee, "tokenizer", Counting())
    referee.encode(["a yellow banana", "a yellow banana"])
    referee.encode(["a yellow banana"])
    assert len(calls) == 1
    batch = referee.encode(["a cat", "a yellow banana"])
    assert batch.ids.shape[1] == len(referee.token_ids("a yellow banana"))  # padded per batch
    assert math.isclose(float(batch.mask[0].sum()), len(referee.token_ids("a cat")))
