"""Parity with TRL 1.16 advantages: `scale_rewards` group | batch | none and
`multi_objective_aggregation` sum_then_normalize | normalize_then_sum (GDPO).

TRL computes advantages inside `GRPOTrainer._generate_and_score_completions`, which needs a model
and generation, so `trl_advantages` re-types trl/trainer/grpo_trainer.py L2759-2810 of the
installed trl 1.16.0 line by line; `nanstd` is TRL's own (trl/trainer/utils.py L1021,
Bessel-corrected). Both sides get the same tensors.

Mapping: TRL's `rewards_per_func` (N, K) has NaN where a reward function returned None and
`reward_weights` (K,); grpo_ar's RewardResult has `components` (N, K) with NaN where failed or
unused, `weights` (N, K) with 0 where unused, and `total` (N,) NaN when a weighted reward failed.
Where a row has a NaN in TRL, the tests give grpo_ar weight 0 (the entry does not use that
reward) or make the whole row unscorable; both sides then agree. They differ by design on a row
where one weighted reward failed and another did not: TRL keeps the row (the failed reward counts
0 after `nansum`), grpo_ar drops the sample from every statistic, as in sum_then_normalize.
"""

import pytest
import torch

from grpo_ar.core import compute_advantages

grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
nanstd = pytest.importorskip("trl.trainer.utils").nanstd


def trl_advantages(rewards_per_func, reward_weights, num_generations, scale, aggregation):
    """grpo_trainer.py L2759-2810 (trl 1.16.0), the train-mode path, one process."""
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)  # L2759
    if aggregation == "sum_then_normalize":  # L2761-2788
        rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
        mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
        if scale in ["group", "none"]:
            std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
            std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
        elif scale == "batch":
            std_rewards = nanstd(rewards).expand_as(rewards)
        advantages = rewards - mean_grouped_rewards
        if scale != "none":
            advantages = advantages / (std_rewards + 1e-4)
    else:  # normalize_then_sum, L2790-2800
        k = rewards_per_func.shape[1]
        grouped = rewards_per_func.view(-1, num_generations, k)
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True)
        reward_k = (grouped - mean_k) / (std_k + 1e-4)
        reward_k = reward_k.view(-1, k)
        rewards = (reward_k * reward_weights.unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        std_rewards = nanstd(rewards).expand_as(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)  # L2810


def reward_result(rewards_per_func, reward_weights):
    """What grpo_ar's RewardComputer reports for the same scores: a NaN is an unused reward."""
    used = ~torch.isnan(rewards_per_func)
    weights = torch.where(used, reward_weights.expand_as(rewards_per_func), 0.0)
    total = (rewards_per_func.nan_to_num() * weights).sum(1)
    total[~used.any(1)] = torch.nan
    return total, rewards_per_func, weights


def scores(n, k, g, seed, dtype, unscorable, binary_first=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=gen, dtype=torch.float64)
    if binary_first:
        x[:, 0] = (x[:, 0] > 0).double()
    x[0:g, 0] = 1.0  # a group with no spread in reward 0 (exact: TRL's mean of equal 1.0s is 1.0)
    if k > 1:
        x[g : 2 * g, 1] = torch.nan  # the second group's entries do not use reward 1
    if unscorable:
        x[2 * g + 1] = torch.nan  # every reward returned None
        x[3 * g : 4 * g - 1] = torch.nan  # one scorable member left in group 3
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("unscorable", [False, True])
def test_scale_rewards_match_trl(scale, k, unscorable, dtype):
    g = 4
    rpf = scores(8 * g, k, g, seed=k, dtype=dtype, unscorable=unscorable)
    w = torch.tensor([1.0, 0.5, 2.0][:k], dtype=dtype)
    expected = trl_advantages(rpf.clone(), w, g, scale, "sum_then_normalize")
    total, _, _ = reward_result(rpf, w)
    adv, valid = compute_advantages("grpo", total, g, scale=scale, eps=1e-4)
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)
    assert valid.tolist() == (~torch.isnan(rpf).all(1)).tolist()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("g", [2, 4, 8])
@pytest.mark.parametrize("unscorable", [False, True])
def test_normalize_then_sum_matches_trl(k, g, unscorable, dtype):
    rpf = scores(6 * g, k, g, seed=10 * k + g, dtype=dtype, unscorable=unscorable)
    w = torch.tensor([1.0, 0.5, 2.0][:k], dtype=dtype)
    expected = trl_advantages(rpf.clone(), w, g, "group", "normalize_then_sum")
    total, comp, weights = reward_result(rpf, w)
    adv, valid = compute_advantages(
        "grpo", total, g, components=comp, weights=weights, multi_objective="normalize_then_sum"
    )
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)
    assert valid.tolist() == (~torch.isnan(rpf).all(1)).tolist()


def test_trl_ignores_scale_rewards_under_normalize_then_sum():
    """Why grpo_ar refuses scale != 'group' with GDPO: TRL's L2790-2800 never reads it."""
    rpf = scores(16, 2, 4, seed=3, dtype=torch.float64, unscorable=False)
    w = torch.tensor([1.0, 1.0], dtype=torch.float64)
    a, b = (trl_advantages(rpf.clone(), w, 4, s, "normalize_then_sum") for s in ("group", "none"))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="fixes its own scaling"):
        compute_advantages("grpo", rpf.sum(1), 4, components=rpf, weights=torch.ones(16, 2),
                           multi_objective="normalize_then_sum", scale="none")  # fmt: skip
