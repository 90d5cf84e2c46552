"""Per-token KL estimators between the policy and the reference. Schulman, "Approximating KL
divergence" (2020): k1 = log r', k2 = ½ (log r')², k3 = r - 1 - log r with r = π_ref / π.

Signature: `fn(logp, ref_logp, *, clamp)` on (N, T) tensors -> (N, T). The log-ratio is clamped
to ±clamp so exp stays finite when a token's probability collapses.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from .registry import Registry


class KLFn(Protocol):
    """The signature every `KL` entry shares; options (`clamp`) are keyword-only."""

    def __call__(
        self,
        logp: Tensor,  # (N, T) log π, with gradient
        ref_logp: Tensor,  # (N, T) log π_ref
        /,
        *args: Any,
        **options: Any,
    ) -> Tensor:  # (N, T) per-token KL estimate
        ...


KL: Registry[KLFn] = Registry("KL estimator")


def log_ratio(logp: Tensor, ref_logp: Tensor, clamp: float) -> Tensor:
    """log(π_ref / π), clamped."""
    return torch.clamp(ref_logp - logp, -clamp, clamp)


@KL.register("k1")
def k1(logp: Tensor, ref_logp: Tensor, *, clamp: float = 20.0) -> Tensor:
    """log π - log π_ref (unbiased, high variance, can be negative)."""
    return -log_ratio(logp, ref_logp, clamp)


@KL.register("k2")
def k2(logp: Tensor, ref_logp: Tensor, *, clamp: float = 20.0) -> Tensor:
    """½ (log π - log π_ref)²."""
    return 0.5 * log_ratio(logp, ref_logp, clamp) ** 2


@KL.register("k3")
def k3(logp: Tensor, ref_logp: Tensor, *, clamp: float = 20.0) -> Tensor:
    """exp(ref - logp) - (ref - logp) - 1 ≥ 0: the GRPO paper's estimator (arXiv 2402.03300 eq. 4)."""
    lr = log_ratio(logp, ref_logp, clamp)
    return torch.exp(lr) - lr - 1
