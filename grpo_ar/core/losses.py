"""Per-token policy losses (to be minimised) on (N, T) log-probs.

Signature: `fn(logp, old_logp, adv, mask, *, options, is_weight=None) -> PolicyLoss`. `adv` is
(N,) or (N, T); `mask` (N, T) marks completion tokens (padding never enters a sequence
statistic). `is_weight` is the detached sampler importance-sampling correction (see
`corrections.py`), (N, T) or (N, 1): a loss multiplies its per-token loss by it, except where the
paper folds it into its own weight (VESPO). Aggregation over tokens lives in `aggregation.py`.

`ratio_level`: "token" uses r_t = π/π_old per token; "sequence" uses GSPO's length-normalised
s = exp(mean_t log π/π_old) for the whole sequence (arXiv 2507.18071 eq. 7). A loss that takes
no `ratio_level` option declares its level when registered (`LOSSES.info(name)`), so that code
which needs the ratio outside the loss (the KL bias correction) asks the loss, not a name list.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from .registry import Registry


class PolicyLoss(NamedTuple):
    """Per-token loss and where the clip was active (float 0/1), all broadcastable to (N, T)."""

    loss: Tensor
    clipped_low: Tensor
    clipped_high: Tensor


class LossFn(Protocol):
    """The signature every `LOSSES` entry shares; options are keyword-only with defaults."""

    def __call__(
        self,
        logp: Tensor,  # (N, T) log π of the sampled tokens, with gradient
        old_logp: Tensor,  # (N, T) log π_old (the policy that sampled; = sg(logp) on-policy)
        adv: Tensor,  # (N,) or (N, T) advantages
        mask: Tensor,  # (N, T) 1 on completion tokens, 0 on padding
        /,
        *args: Any,
        **options: Any,  # hyper-parameters, plus the inputs is_weight / generator it takes
    ) -> PolicyLoss: ...


LOSSES: Registry[LossFn] = Registry(
    "policy loss",
    inputs=("is_weight", "generator"),
    # the ratio a loss without a `ratio_level` option uses; one with the option uses that
    info={"ratio_level": "token"},
)

# exp(±20) is finite in fp32 and far past any clip range: a collapsed token cannot give inf.
LOG_RATIO_CLAMP = 20.0
RATIO_LEVELS = ("token", "sequence")


def _adv(adv: Tensor) -> Tensor:
    return adv.unsqueeze(-1) if adv.ndim == 1 else adv


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """(N, T) -> (N, 1) mean over mask == 1; `where` so garbage under padding cannot leak."""
    m = mask.to(x.dtype)
    total = torch.where(mask.bool(), x, torch.zeros_like(x)).sum(-1, keepdim=True)
    return total / m.sum(-1, keepdim=True).clamp(min=1)


def log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, level: str) -> Tensor:
    """Clamped log π/π_old: (N, T) per token, or (N, 1) GSPO sequence mean."""
    if level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level={level!r}: use 'token' or 'sequence'")
    lr = logp - old_logp
    if level == "sequence":
        lr = _masked_mean(lr, mask)
    return torch.clamp(lr, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def _ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    return torch.exp(torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def _weighted(out: PolicyLoss, is_weight: Tensor | None, shape: torch.Size) -> PolicyLoss:
    """Apply the sampler IS weight and broadcast every field to the (N, T) token grid."""
    loss = out.loss if is_weight is None else out.loss * is_weight.detach()
    return PolicyLoss(*(t.expand(shape) for t in (loss, out.clipped_low, out.clipped_high)))


def _clipped_surrogate(
    ratio: Tensor,
    adv: Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
    delta: float | None = None,
) -> PolicyLoss:
    clipped = -torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    # two-sided clip (INTELLECT-2, arXiv 2505.07291 §3.3): the unclipped branch is capped at δ
    unclipped = -(ratio if delta is None else torch.clamp(ratio, max=delta)) * adv
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        # dual-clip PPO (arXiv 1912.09729): bound the loss of negative-advantage tokens by -c·A
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)
    low = ((ratio < 1 - eps_low) & (adv < 0)).to(ratio.dtype)
    high = ((ratio > 1 + eps_high) & (adv > 0)).to(ratio.dtype)
    return PolicyLoss(loss, low, high)


def _check_clip(eps_low: float, eps_high: float, dual_clip: float | None = None) -> None:
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (e.g. 3.0), got {dual_clip}")


@LOSSES.register("clip")
def clip(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *,
    eps_low: float = 0.2, eps_high: float = 0.2, dual_clip: float | None = None,
    delta: float | None = None, ratio_level: str = "token", is_weight: Tensor | None = None,
) -> PolicyLoss:  # fmt: skip
    """-min(r·A, clip(r, 1-ε_low, 1+ε_high)·A). PPO arXiv 1707.06347; GRPO arXiv 2402.03300
    eq. 3; asymmetric ε (clip-higher) DAPO arXiv 2503.14476; `delta` caps r in the unclipped
    branch (INTELLECT-2, TRL `delta`; δ = ∞ is plain clip); `dual_clip` arXiv 1912.09729."""
    _check_clip(eps_low, eps_high, dual_clip)
    if delta is not None and delta <= 1 + eps_high:
        raise ValueError(f"delta={delta} must exceed 1 + eps_high = {1 + eps_high}")
    ratio = torch.exp(log_ratio(logp, old_logp, mask, ratio_level))
    out = _clipped_surrogate(ratio, _adv(adv), eps_low, eps_high, dual_clip, delta)
    return _weighted(out, is_weight, logp.shape)


@LOSSES.register("gspo", ratio_level="sequence")
def gspo(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *,
    eps_low: float = 3e-4, eps_high: float = 4e-4, is_weight: Tensor | None = None,
) -> PolicyLoss:  # fmt: skip
    """Clipped surrogate on the sequence ratio s = exp(mean_t log π/π_old). GSPO arXiv 2507.18071
    eq. 5-7 (= `clip` with ratio_level="sequence" and GSPO's ε)."""
    return clip(
        logp, old_logp, adv, mask, eps_low=eps_low, eps_high=eps_high, ratio_level="sequence",
        is_weight=is_weight,
    )  # fmt: skip


@LOSSES.register("gspo_token", ratio_level="sequence")
def gspo_token(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *,
    eps_low: float = 3e-4, eps_high: float = 4e-4, is_weight: Tensor | None = None,
) -> PolicyLoss:  # fmt: skip
    """GSPO-token (arXiv 2507.18071 eq. 13-14): s_t = sg[s]·π(y_t)/sg[π(y_t)], so the value is
    the sequence ratio but each token carries its own gradient (token-level advantages allowed)."""
    _check_clip(eps_low, eps_high)
    seq = log_ratio(logp, old_logp, mask, "sequence").detach()
    ratio = torch.exp(seq + logp - logp.detach())
    out = _clipped_surrogate(ratio, _adv(adv), eps_low, eps_high)
    return _weighted(out, is_weight, logp.shape)


@LOSSES.register("cispo")
def cispo(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *,
    max_weight: float = 5.0, min_weight: float = 0.0, ratio_level: str = "token",
    is_weight: Tensor | None = None,
) -> PolicyLoss:  # fmt: skip
    """-sg(clip(r, min, max))·A·log π: the IS weight is clipped and detached, every token keeps a
    gradient. CISPO, MiniMax-M1 arXiv 2506.13585 eq. 4; `max_weight` is TRL's `epsilon_high` /
    ScaleRL's ε_max (arXiv 2510.13786)."""
    if not 0 <= min_weight < max_weight:
        raise ValueError(f"need 0 <= min_weight < max_weight, got {min_weight}, {max_weight}")
    ratio = torch.exp(log_ratio(logp, old_logp, mask, ratio_level))
    a = _adv(adv)
    weight = torch.clamp(ratio, min_weight, max_weight).detach()
    loss = -weight * a * logp
    low = ((ratio < min_weight) & (a < 0)).to(ratio.dtype)
    high = ((ratio > max_weight) & (a > 0)).to(ratio.dtype)
    return _weighted(PolicyLoss(loss, low, high), is_weight, logp.shape)


@LOSSES.register("sapo")
def sapo(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *,
    tau_pos: float = 1.0, tau_neg: float = 1.05, ratio_level: str = "token",
    is_weight: Tensor | None = None,
) -> PolicyLoss:  # fmt: skip
    """-(4/τ)·σ(τ·(r - 1))·A, τ = τ_pos if A > 0 else τ_neg: a soft gate in place of the hard clip;
    at r = 1 its gradient equals the unclipped one (∂/∂r = σ'(0)·4 = 1). SAPO arXiv 2511.20347
    (TRL `sapo_temperature_pos/neg`)."""
    if tau_pos <= 0 or tau_neg <= 0:
        raise ValueError(f"need tau_pos > 0 and tau_neg > 0, got {tau_pos}, {tau_neg}")
    ratio = torch.exp(log_ratio(logp, old_logp, mask, ratio_level))
    a = _adv(adv)
    tau = torch.where(a > 0, tau_pos, tau_neg).to(ratio.dtype)
    loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * a
    zero = torch.zeros_like(ratio)
    return _weighted(PolicyLoss(loss, zero, zero), is_weight, logp.shape)


@LOSSES.register("luspo")
def luspo(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *,
    eps_low: float = 3e-4, eps_high: float = 4e-4, ratio_level: str = "sequence",
    is_weight: Tensor | None = None,
) -> PolicyLoss:  # fmt: skip
    """GSPO's sequence loss scaled by the sequence length |y| (LUSPO arXiv 2602.05261): with
    `seq_mean_token_mean` it is TRL's `luspo` (Σ_t loss / batch). Needs sequence-level ratios."""
    if ratio_level != "sequence":
        raise ValueError(
            "luspo scales a sequence-level loss by length and needs ratio_level='sequence' "
            f"(got {ratio_level!r}); for token ratios use loss='clip'"
        )
    out = clip(
        logp, old_logp, adv, mask, eps_low=eps_low, eps_high=eps_high, ratio_level="sequence"
    )
    length = mask.to(logp.dtype).sum(-1, keepdim=True)
    loss = out.loss * length
    return _weighted(PolicyLoss(loss, *out[1:]), is_weight, logp.shape)


@LOSSES.register("vespo", ratio_level="sequence")
def vespo(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *,
    k_pos: float = 2.0, lambda_pos: float = 3.0, k_neg: float = 3.0, lambda_neg: float = 2.0,
    is_weight: Tensor | None = None,
) -> PolicyLoss:  # fmt: skip
    """-sg(φ(w))·A·log π with φ(w) = e^λ·w^k·e^(-λw) (φ(1) = 1), w = Π_t π/π_old the sequence
    IS weight (times the sampler correction, folded in log space). VESPO arXiv 2602.10693; TRL
    `get_gamma_weights` (k±, λ±; w clamped to [1e-8, e^20])."""
    if min(k_pos, k_neg) < 0 or min(lambda_pos, lambda_neg) <= 0:
        raise ValueError("vespo needs k_pos, k_neg >= 0 and lambda_pos, lambda_neg > 0")
    lower = math.log(1e-8)
    m = mask.bool()
    lr = torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).detach()
    log_w = torch.where(m, lr, torch.zeros_like(lr)).sum(-1, keepdim=True)
    if is_weight is not None:
        log_is = torch.clamp(torch.log(is_weight.detach()), lower, LOG_RATIO_CLAMP)
        log_w = log_w + torch.where(m, log_is.expand_as(lr), torch.zeros_like(lr)).sum(-1, True)
    log_w = torch.clamp(log_w, lower, LOG_RATIO_CLAMP)
    a = _adv(adv)
    # the sign of the (sequence-mean) advantage picks k, λ per sequence
    a_seq = _masked_mean(a.expand_as(logp), mask) if a.shape[-1] != 1 else a
    pos = a_seq >= 0
    k = torch.where(pos, k_pos, k_neg).to(logp.dtype)
    lam = torch.where(pos, lambda_pos, lambda_neg).to(logp.dtype)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    phi = phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    loss = -phi * a * logp
    zero = torch.zeros_like(phi)
    return _weighted(PolicyLoss(loss, zero, zero), None, logp.shape)


def _token_cov(adv: Tensor, logp: Tensor, mask: Tensor) -> Tensor:
    """(N, T) centred A·log π products over the valid tokens (verl's `cov_all`), -inf elsewhere."""
    m = mask.bool()
    a = adv.expand_as(logp)
    n = m.sum().clamp(min=1)
    zero = torch.zeros_like(logp)
    a_mean = torch.where(m, a, zero).sum() / n
    lp = logp.detach()
    lp_mean = torch.where(m, lp, zero).sum() / n
    cov = (a - a_mean) * (lp - lp_mean)
    return torch.where(m, cov, torch.full_like(cov, -math.inf))


@LOSSES.register("clip_cov")
def clip_cov(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *,
    eps_low: float = 0.2, eps_high: float = 0.2, cov_ratio: float = 2e-4, cov_lb: float = 1.0,
    cov_ub: float = 5.0, is_weight: Tensor | None = None, generator: torch.Generator | None = None,
) -> PolicyLoss:  # fmt: skip
    """PPO clip, plus: of the unclipped tokens whose centred covariance (A - Ā)(log π - mean)
    lies in (lb, ub), a random `cov_ratio` fraction (≥ 1) gets no gradient. Clip-Cov, "The Entropy
    Mechanism of RL for Reasoning LMs" arXiv 2505.22617 §4; verl `compute_policy_loss_clip_cov`.
    Statistics are over the tokens of this call (verl: the micro-batch); one host sync for k."""
    _check_clip(eps_low, eps_high)
    if cov_ratio <= 0 or cov_lb >= cov_ub:
        raise ValueError(
            f"need cov_ratio > 0 and cov_lb < cov_ub, got {cov_ratio}, {cov_lb}, {cov_ub}"
        )
    a = _adv(adv)
    out = _clipped_surrogate(_ratio(logp, old_logp), a, eps_low, eps_high)
    ratio = _ratio(logp, old_logp)
    by_clip = (-torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a > -ratio * a) & mask.bool()
    cov = _token_cov(a, logp, mask).masked_fill(by_clip, -math.inf)
    candidate = ((cov > cov_lb) & (cov < cov_ub)).flatten()
    n_drop = max(int(cov_ratio * float(mask.sum())), 1)
    # a random n_drop of the candidates: random keys, candidates first, take the smallest keys
    keys = torch.rand(candidate.shape, generator=generator, device=candidate.device)
    keys = torch.where(candidate, keys, torch.full_like(keys, 2.0))
    order = keys.argsort()[:n_drop]
    drop = torch.zeros_like(candidate)
    drop[order] = candidate[order]
    corr = (~drop).view_as(logp).to(logp.dtype)
    return _weighted(PolicyLoss(out.loss * corr, *out[1:]), is_weight, logp.shape)


@LOSSES.register("kl_cov")
def kl_cov(
    logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *,
    cov_ratio: float = 2e-4, kl_coef: float = 1.0, is_weight: Tensor | None = None,
) -> PolicyLoss:  # fmt: skip
    """-r·A, plus kl_coef·|log π/π_old| on the top `cov_ratio` fraction (≥ 1) of valid tokens by
    centred covariance (A - Ā)(log π - mean). KL-Cov, arXiv 2505.22617 §4; verl
    `compute_policy_loss_kl_cov` (no clip). Statistics are over the tokens of this call; one host
    sync for k."""
    if cov_ratio <= 0 or kl_coef < 0:
        raise ValueError(f"need cov_ratio > 0 and kl_coef >= 0, got {cov_ratio}, {kl_coef}")
    a = _adv(adv)
    lr = torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    loss = -torch.exp(lr) * a
    cov = _token_cov(a, logp, mask).flatten()
    k = min(max(int(float(mask.sum()) * cov_ratio), 1), int(mask.sum()))
    top = torch.zeros_like(cov, dtype=torch.bool)
    top[cov.topk(k).indices] = True
    top = top.view_as(logp) & mask.bool()
    loss = torch.where(top, loss + kl_coef * lr.abs(), loss)
    zero = torch.zeros_like(loss)
    return _weighted(PolicyLoss(loss, zero, zero), is_weight, logp.shape)
