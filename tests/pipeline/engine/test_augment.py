"""Augmented referee views: shapes, per-sample determinism, differentiability, normalisation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pipeline.engine.augment import ViewAugmenter
from pipeline.pooling import pool_to

# Float results that depend on the CPU's kernels: `make test-numerics` runs them on other kernel paths.
pytestmark = pytest.mark.numerics


@pytest.fixture(scope="module")
def augmenter(tiny_cfg, generator_models) -> ViewAugmenter:
    return ViewAugmenter(tiny_cfg.augment, generator_models.referee.config.vision_config.image_size)


def _images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_views_shape_and_per_sample_determinism(augmenter) -> None:
    images = _images(3)
    views = augmenter(images, [11, 22, 33], iteration=5)
    assert views.shape == (3, augmenter.num_views, 3, augmenter.size, augmenter.size)
    assert views.dtype == torch.float32
    assert torch.equal(views, augmenter(images, [11, 22, 33], iteration=5))
    # A sample's views depend on its own seed and the iteration only, not on its batch mates.
    assert torch.equal(views[1:2], augmenter(images[1:2], [22], iteration=5))
    assert torch.equal(views[2:], augmenter(images[[0, 2]], [99, 33], iteration=5)[1:])
    assert not torch.allclose(views[1:2], augmenter(images[1:2], [22], iteration=6))
    assert not torch.allclose(views[0, 0], views[0, 1])  # the views of one image differ


def test_global_rng_is_left_alone(augmenter) -> None:
    before = torch.get_rng_state()
    augmenter(_images(2), [1, 2], iteration=0)
    assert torch.equal(before, torch.get_rng_state())


def test_views_are_differentiable_even_on_black_images(augmenter) -> None:
    images = torch.cat([_images(1), torch.zeros(1, 3, 64, 64)]).requires_grad_(True)
    views = augmenter(images, [3, 4], iteration=1)
    views.square().mean().backward()
    assert torch.isfinite(images.grad).all()
    assert images.grad[0].abs().sum() > 0 and images.grad[1].abs().sum() > 0


def test_pooling_and_clip_normalisation(augmenter, tiny_cfg) -> None:
    images = _images(2)
    s = augmenter.size
    pooled = (F.adaptive_avg_pool2d(images, s) + F.adaptive_max_pool2d(images, s)) / 2
    torch.testing.assert_close(pool_to(images, s), pooled)
    mean = torch.tensor(tiny_cfg.augment.clip_mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny_cfg.augment.clip_std).view(1, 3, 1, 1)
    torch.testing.assert_close(augmenter.plain(images), (pooled - mean) / std)
    # With every random op switched off, a view is exactly the plain input.
    off = dataclasses.replace(
        tiny_cfg.augment, affine_degrees=0.0, affine_translate=[0.0, 0.0], perspective_p=0.0, jitter_p=0.0,
        erasing_p=0.0, noise_std=0.0, noise_std_max=0.0,
    )
    views = ViewAugmenter(off, s)(images, [1, 2], iteration=0)
    torch.testing.assert_close(views, augmenter.plain(images)[:, None].expand_as(views), rtol=0, atol=1e-5)


def test_gaussian_noise_levels(tiny_cfg) -> None:
    cfg = dataclasses.replace(
        tiny_cfg.augment, num_views=64, affine_degrees=0.0, affine_translate=[0.0, 0.0], perspective_p=0.0,
        jitter_p=0.0, erasing_p=0.0,
    )
    aug = ViewAugmenter(cfg, 32)
    images = torch.full((1, 3, 32, 32), 0.5)
    noise = (aug(images, [7], 0) - aug.plain(images)[:, None]) * aug.std  # back to pixel units
    per_view = noise[0].flatten(1).std(dim=1)
    # std^2 = noise_std^2 + U(0, noise_std_max)^2: between the two extremes, mean near E[...].
    lo, hi = cfg.noise_std, (cfg.noise_std**2 + cfg.noise_std_max**2) ** 0.5
    assert torch.all(per_view > lo * 0.95) and torch.all(per_view < hi * 1.05)
    assert per_view.std() > 0  # the first noise's std differs per view


def _only(tiny_cfg, **on) -> object:
    """The tiny augment config with every random op off except those in ``on``."""
    off = dict(affine_degrees=0.0, affine_translate=[0.0, 0.0], perspective_p=0.0, jitter_p=0.0, erasing_p=0.0,
               noise_std=0.0, noise_std_max=0.0, num_views=6)
    return dataclasses.replace(tiny_cfg.augment, **{**off, **on})


def _erased(aug: ViewAugmenter, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """[B, N, S, S] masks of the erased pixels (erasing writes 0 into an all-ones image)."""
    views = aug(images, seeds, iteration=3) * aug.std + aug.mean  # back to pixel units
    return views.amin(dim=2) < 0.5


def test_erasing_shares_one_rectangle_among_an_images_views_only(tiny_cfg) -> None:
    aug = ViewAugmenter(_only(tiny_cfg, erasing_p=1.0, erase_same_on_views=True), 32)
    masks = _erased(aug, torch.ones(3, 3, 64, 64), [11, 12, 13])
    assert masks.any(dim=(2, 3)).all()  # every view has a rectangle
    for b in range(3):
        assert all(torch.equal(masks[b, 0], masks[b, k]) for k in range(1, masks.shape[1]))
    # the samples of one batch are never coupled: each image draws its own rectangle
    assert not torch.equal(masks[0, 0], masks[1, 0]) or not torch.equal(masks[1, 0], masks[2, 0])


def test_erasing_per_view_when_not_shared(tiny_cfg) -> None:
    aug = ViewAugmenter(_only(tiny_cfg, erasing_p=1.0, erase_same_on_views=False), 32)
    masks = _erased(aug, torch.ones(1, 3, 64, 64), [11])
    assert len({tuple(masks[0, k].flatten().tolist()) for k in range(masks.shape[1])}) > 1


@pytest.mark.parametrize(("translate", "moves_x"), [([0.0, 0.1], False), ([0.1, 0.0], True)])
def test_translate_is_per_axis(tiny_cfg, translate, moves_x) -> None:
    """An image that varies along x only: a y-only shift leaves the middle row as it was."""
    aug = ViewAugmenter(_only(tiny_cfg, affine_translate=translate, num_views=8), 32)
    ramp = torch.linspace(0.0, 1.0, 64).expand(1, 3, 64, 64).contiguous()
    views = aug(ramp, [5], iteration=0)[0]
    mid = views[:, :, 16, :]
    plain_mid = aug.plain(ramp)[0, :, 16, :].expand_as(mid)
    assert torch.allclose(mid, plain_mid, atol=1e-5) is not moves_x


def test_batched_views_are_the_per_sample_views(augmenter) -> None:
    """One call per op over every sample's views gives the views (and gradients) of one call per sample."""
    seeds, images = [11, 12, 13, 14], _images(4)
    calls = {type(op).__name__: 0 for op in augmenter.ops}

    def count(module, args):
        calls[type(module).__name__] += 1

    handles = [op.register_forward_pre_hook(count) for op in augmenter.ops]
    try:
        for iteration in (3, [0, 5, 5, 9]):
            a = images.clone().requires_grad_(True)
            b = images.clone().requires_grad_(True)
            batched = augmenter(a, seeds, iteration)
            per_sample = augmenter.per_sample(b, seeds, iteration)
            assert torch.equal(batched, per_sample)
            weights = torch.randn(batched.shape, generator=torch.Generator().manual_seed(1))
            (batched * weights).sum().backward()
            (per_sample * weights).sum().backward()
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    finally:
        for h in handles:
            h.remove()
    # per_sample: 4 samples x 2 calls; batched: once per op per call (ColorJitter once per distinct order)
    assert calls["RandomAffine"] == calls["RandomPerspective"] == calls["RandomErasing"] == 2 * 4 + 2
    assert 2 * 4 + 2 <= calls["ColorJitter"] <= 2 * 4 + 2 * 4
