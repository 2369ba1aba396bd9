"""GORS's reward weighting: mean over the batch of reward x per-image MSE, checked against a hand computation."""

from __future__ import annotations

import torch

from pipeline.finetune.loss import reward_weighted_mse, training_loss
from pipeline.finetune.train import build_loop


def test_reward_weighting_equals_the_hand_computed_formula() -> None:
    pred = torch.zeros(3, 1, 1, 2)
    target = torch.tensor([[[[1.0, 1.0]]], [[[2.0, 0.0]]], [[[0.0, 3.0]]]])
    rewards = torch.tensor([0.5, 0.9, 0.25])
    loss, per = reward_weighted_mse(pred, target, rewards)
    # per-image MSE: (1 + 1) / 2 = 1, (4 + 0) / 2 = 2, (0 + 9) / 2 = 4.5; weighted: 0.5, 1.8, 1.125; mean over 3.
    assert per.tolist() == [1.0, 2.0, 4.5]
    assert abs(float(loss) - (0.5 + 1.8 + 1.125) / 3) < 1e-7
    # not the reward-normalised mean a weighted average would give
    assert abs(float(loss) - (0.5 + 1.8 + 1.125) / float(rewards.sum())) > 0.1


def test_batch_loss_is_each_samples_own_loss_times_its_reward(finetune_cfg, fixed_batch) -> None:
    """Through the tiny SD: the batch loss = (1/B) sum_b r_b x (sample b's MSE alone, reward 1). Each sample's
    draws depend only on (seed, step, its index), so the per-sample losses are computable one by one."""
    loop = build_loop(finetune_cfg)
    images, captions, rewards = fixed_batch
    with torch.no_grad():
        loss, _ = training_loss(loop.parts, images, captions, rewards, seed=7, step=3, indices=[0, 1])
        alone = [float(training_loss(loop.parts, images[b:b + 1], captions[b:b + 1], torch.ones(1), seed=7, step=3,
                                     indices=[b])[0]) for b in range(2)]
    hand = (float(rewards[0]) * alone[0] + float(rewards[1]) * alone[1]) / 2
    assert abs(float(loss) - hand) < 1e-5 * max(1.0, hand)
    assert alone[0] != alone[1]
