"""Advantage estimators: (N,) rewards of contiguous groups -> (N,) advantages.

Every entry has the signature `fn(rewards, valid, group_size, *, options)`: `rewards` has no
NaN (failed rewards arrive as 0 with `valid == False`), invalid samples are left out of every
statistic and get advantage 0. Call `compute_advantages`, which prepares both.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from .registry import Registry

ADVANTAGES = Registry("advantage estimator")


def _group_stats(r: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(P, G) rewards and validity -> per-group count, mean, unbiased std, zero-spread flag (P, 1)."""
    vf = v.to(r.dtype)
    n = vf.sum(1, keepdim=True)
    mean = (r * vf).sum(1, keepdim=True) / n.clamp(min=1)
    var = (((r - mean) * vf) ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)
    big = torch.finfo(r.dtype).max
    hi = torch.where(v, r, torch.full_like(r, -big)).amax(1, keepdim=True)
    lo = torch.where(v, r, torch.full_like(r, big)).amin(1, keepdim=True)
    # exact test: a mean of equal floats need not equal them, so (r - mean) alone can be 1e-17
    flat = (hi <= lo) | (n <= 1)
    return n, mean, var.sqrt(), flat


def _batch_std(x: Tensor, v: Tensor) -> Tensor:
    """Unbiased std of the valid entries of x (any shape), 0 when fewer than two."""
    vf = v.to(x.dtype)
    n = vf.sum()
    mean = (x * vf).sum() / n.clamp(min=1)
    return ((((x - mean) * vf) ** 2).sum() / (n - 1).clamp(min=1)).sqrt()


@ADVANTAGES.register("grpo")
def grpo(rewards: Tensor, valid: Tensor, group_size: int, *, eps: float = 1e-4) -> Tensor:
    """(r - mean_g) / (std_g + eps). DeepSeekMath, arXiv 2402.03300 §4.1.2."""
    r, v = (rearrange(t, "(p g) -> p g", g=group_size) for t in (rewards, valid))
    _, mean, std, flat = _group_stats(r, v)
    adv = torch.where(v & ~flat, (r - mean) / (std + eps), torch.zeros_like(r))
    return rearrange(adv, "p g -> (p g)")


@ADVANTAGES.register("dr_grpo")
def dr_grpo(rewards: Tensor, valid: Tensor, group_size: int) -> Tensor:
    """r - mean_g, no std division. Dr. GRPO, arXiv 2503.20783 §3."""
    r, v = (rearrange(t, "(p g) -> p g", g=group_size) for t in (rewards, valid))
    _, mean, _, flat = _group_stats(r, v)
    adv = torch.where(v & ~flat, r - mean, torch.zeros_like(r))
    return rearrange(adv, "p g -> (p g)")


@ADVANTAGES.register("rloo")
def rloo(rewards: Tensor, valid: Tensor, group_size: int) -> Tensor:
    """r_i - mean of the other valid members of the group. RLOO, arXiv 2402.14740 eq. (3)."""
    r, v = (rearrange(t, "(p g) -> p g", g=group_size) for t in (rewards, valid))
    n, mean, _, flat = _group_stats(r, v)
    # r_i - (n·mean - r_i)/(n - 1) = n/(n - 1) · (r_i - mean)
    adv = n / (n - 1).clamp(min=1) * (r - mean)
    adv = torch.where(v & ~flat, adv, torch.zeros_like(r))
    return rearrange(adv, "p g -> (p g)")


@ADVANTAGES.register("reinforce_pp")
def reinforce_pp(rewards: Tensor, valid: Tensor, group_size: int, *, eps: float = 1e-4) -> Tensor:
    """Group-mean baseline, then whitened over the batch. REINFORCE++-baseline, arXiv 2501.03262.

    After group centring the batch mean of the valid advantages is 0 by construction, so the
    whitening only divides by the batch std (zero-spread groups stay exactly 0).
    """
    centred = dr_grpo(rewards, valid, group_size)
    return centred / (_batch_std(centred, valid) + eps)


@ADVANTAGES.register("grpo_batch_std")
def grpo_batch_std(rewards: Tensor, valid: Tensor, group_size: int, *, eps: float = 1e-4) -> Tensor:
    """(r - mean_g) / (std_batch + eps): group baseline, batch scale. Lite PPO, arXiv 2508.08221."""
    centred = dr_grpo(rewards, valid, group_size)
    return centred / (_batch_std(rewards, valid) + eps)


def compute_advantages(
    name: str, rewards: Tensor, group_size: int, **options: float
) -> tuple[Tensor, Tensor]:
    """(N,) rewards with NaN for failures -> ((N,) advantages, (N,) bool validity)."""
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}"
        )
    valid = torch.isfinite(rewards)
    clean = torch.where(valid, rewards, torch.zeros_like(rewards))
    return ADVANTAGES[name](clean, valid, group_size, **options), valid
