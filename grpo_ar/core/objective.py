"""The per-token GRPO objective of one micro-batch, composed from the registries.

policy(logp, old, A; sampler IS weight) · off-policy mask · entropy mask + β · KL(·, ref), in
the order of TRL 1.16's `_compute_loss`, so the parity tests can compare it term by term. The
trainer calls this once per micro-batch and reduces the result with an aggregation; names and
scalars come in, never a config object.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .corrections import (
    IS_CORRECTIONS,
    bias_corrected_kl,
    high_entropy_mask,
    off_policy_sequence_mask,
)
from .kl import KL
from .losses import LOSSES, PolicyLoss


class TokenTerms(NamedTuple):
    """(N, T) per-token objective and its parts, for the loss and for logging."""

    loss: Tensor  # policy · masks + β·KL, to be aggregated
    policy: PolicyLoss  # the policy term before masks, with clip diagnostics
    kl: Tensor | None  # per-token KL (bias-corrected when asked), None without a reference
    keep: Tensor  # (N, T) float 0/1: completion tokens the policy term acts on
    entropy_keep: Tensor  # (N, T) float 0/1: tokens the entropy selection keeps (bonus mask)
    is_weight: Tensor | None  # the sampler IS weight applied, (N, T) or (N, 1)


def ratio_level(loss: str, loss_args: Mapping[str, Any]) -> str:
    """The level (token | sequence) of the ratio a loss uses, as the KL bias correction needs:
    its `ratio_level` option where it takes one, else the level it declared when registered."""
    options = LOSSES.options(loss)
    if "ratio_level" in options:
        return str(loss_args.get("ratio_level", options["ratio_level"]))
    return str(LOSSES.info(loss)["ratio_level"])


def token_objective(
    logp: Tensor,
    old_logp: Tensor,
    adv: Tensor,
    mask: Tensor,
    *,
    loss: str = "clip",
    loss_args: Mapping[str, Any] | None = None,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    kl: str = "k3",
    kl_args: Mapping[str, Any] | None = None,
    kl_bias_correction: bool = False,
    sampling_logp: Tensor | None = None,
    is_correction: str | None = None,
    is_correction_args: Mapping[str, Any] | None = None,
    off_policy_mask_threshold: float | None = None,
    entropy: Tensor | None = None,
    top_entropy_quantile: float = 1.0,
    generator: torch.Generator | None = None,
    loss_weight: Tensor | None = None,
    kl_weight: Tensor | None = None,
) -> TokenTerms:
    """(N, T) log-probs of policy / old / reference / sampler, (N,) or (N, T) advantages, (N, T)
    mask -> the per-token objective. Options switched off cost nothing. `loss_weight` /
    `kl_weight` (N, T) scale each token's policy term / KL term (typed spans)."""
    loss_args = dict(loss_args or {})
    keep = mask.to(logp.dtype)
    if top_entropy_quantile < 1.0:
        if entropy is None:
            raise ValueError("top_entropy_quantile < 1 needs the token entropies")
        # TRL's semantics: the quantile of this micro-batch's tokens, so it moves with the split
        keep = keep * high_entropy_mask(entropy.detach(), mask, top_entropy_quantile)
    entropy_keep = keep  # before the off-policy mask: TRL's bonus acts on mask · entropy mask
    is_weight = None
    if is_correction is not None:
        if sampling_logp is None:
            raise ValueError(f"is_correction={is_correction!r} needs the sampler's log-probs")
        is_weight = IS_CORRECTIONS[is_correction](
            old_logp, sampling_logp, mask, **dict(is_correction_args or {})
        )
    if off_policy_mask_threshold is not None:
        # the sampler's log-probs measure how far the data is off-policy (TRL uses them when it
        # has them); grpo_ar always records them
        behaviour = sampling_logp if sampling_logp is not None else old_logp
        keep = keep * off_policy_sequence_mask(
            adv, logp, behaviour, mask, threshold=off_policy_mask_threshold
        )
    inputs = {"is_weight": is_weight, "generator": generator}
    takes = LOSSES.takes(loss)
    policy = LOSSES[loss](
        logp, old_logp, adv, mask, **loss_args, **{k: v for k, v in inputs.items() if k in takes}
    )
    out = policy.loss * keep
    if loss_weight is not None:
        out = out * loss_weight
    kl_tok = None
    if ref_logp is not None and beta > 0:
        kl_tok = KL[kl](logp, ref_logp, **dict(kl_args or {}))
        if kl_bias_correction:  # DeepSeek-V3.2 §2: E_old[r·k3] is unbiased for KL(π || ref)
            level = ratio_level(loss, loss_args)
            kl_tok = bias_corrected_kl(kl_tok, logp, old_logp, mask, ratio_level=level)
        out = out + beta * (kl_tok if kl_weight is None else kl_tok * kl_weight)
    return TokenTerms(out, policy, kl_tok, keep, entropy_keep, is_weight)
