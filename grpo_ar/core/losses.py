"""Per-token policy losses (to be minimised) on (N, T) log-probs.

Signature: `fn(logp, old_logp, adv, mask, *, options) -> PolicyLoss`. `adv` is (N,) or (N, T);
`mask` (N, T) marks completion tokens and is used only by sequence-level ratios (padding never
enters a sequence statistic). Aggregation over tokens lives in `aggregation.py`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .registry import Registry

LOSSES = Registry("policy loss")

# exp(±20) is finite in fp32 and far past any clip range: a collapsed token cannot give inf.
LOG_RATIO_CLAMP = 20.0


class PolicyLoss(NamedTuple):
    """Per-token loss and where the clip was active (float 0/1), all broadcastable to (N, T)."""

    loss: Tensor
    clipped_low: Tensor
    clipped_high: Tensor


def _adv(adv: Tensor) -> Tensor:
    return adv.unsqueeze(-1) if adv.ndim == 1 else adv


def _ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    return torch.exp(torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def _sequence_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """(N, 1) exp of the length-normalised sequence log-ratio (GSPO eq. 7)."""
    m = mask.to(logp.dtype)
    lr = ((logp - old_logp) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
    return torch.exp(torch.clamp(lr, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def _clipped_surrogate(
    ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float, dual_clip: float | None
) -> PolicyLoss:
    unclipped = -ratio * adv
    clipped = -torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        # dual-clip PPO (arXiv 1912.09729): bound the loss of negative-advantage tokens by -c·A
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)
    low = ((ratio < 1 - eps_low) & (adv < 0)).to(ratio.dtype)
    high = ((ratio > 1 + eps_high) & (adv > 0)).to(ratio.dtype)
    return PolicyLoss(loss, low, high)


def _check_clip(eps_low: float, eps_high: float, dual_clip: float | None) -> None:
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (e.g. 3.0), got {dual_clip}")


@LOSSES.register("clip")
def clip(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
) -> PolicyLoss:
    """-min(r·A, clip(r, 1-ε_low, 1+ε_high)·A), r = π/π_old per token. PPO arXiv 1707.06347;
    GRPO arXiv 2402.03300 eq. 3; asymmetric ε (clip-higher) DAPO arXiv 2503.14476."""
    _check_clip(eps_low, eps_high, dual_clip)
    return _clipped_surrogate(_ratio(logp, old_logp), _adv(adv), eps_low, eps_high, dual_clip)


@LOSSES.register("gspo")
def gspo(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> PolicyLoss:
    """Clipped surrogate on the sequence ratio s = exp(mean_t log π/π_old). GSPO arXiv 2507.18071 eq. 5-7."""
    _check_clip(eps_low, eps_high, None)
    out = _clipped_surrogate(
        _sequence_ratio(logp, old_logp, mask), _adv(adv), eps_low, eps_high, None
    )
    shape = logp.shape
    return PolicyLoss(*(t.expand(shape) for t in out))


@LOSSES.register("cispo")
def cispo(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    mask: Tensor,
    *,
    max_weight: float = 5.0,
    min_weight: float = 0.0,
) -> PolicyLoss:
    """-sg(clip(r, min, max))·A·log π: the IS weight is clipped and detached, every token keeps a
    gradient. CISPO, MiniMax-M1 arXiv 2506.13585 eq. 4; `max_weight` is TRL's `epsilon_high` /
    ScaleRL's ε_max (arXiv 2510.13786)."""
    if not 0 <= min_weight < max_weight:
        raise ValueError(f"need 0 <= min_weight < max_weight, got {min_weight}, {max_weight}")
    ratio = _ratio(logp, old_logp)
    a = _adv(adv)
    weight = torch.clamp(ratio, min_weight, max_weight).detach()
    loss = -weight * a * logp
    low = ((ratio < min_weight) & (a < 0)).to(ratio.dtype)
    high = ((ratio > max_weight) & (a > 0)).to(ratio.dtype)
    return PolicyLoss(loss, low.expand_as(loss), high.expand_as(loss))
