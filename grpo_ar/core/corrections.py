"""Corrections and regularisers around the policy loss, on (N, T) tensors (TRL 1.16 semantics).

- `IS_CORRECTIONS`: importance-sampling correction of the gap between the sampler's recorded
  log-prob of each token (`sampling_logp`: top-p, min-p, CFG, another engine) and the trainer's
  log-prob of the policy that sampled (`old_logp`). Signature
  `fn(old_logp, sampling_logp, mask, *, c_min, c_max)` -> detached weights, (N, T) for `token_*`,
  (N, 1) for `sequence_*`; the loss multiplies its per-token loss by them (`losses.is_weight`).
- `off_policy_sequence_mask`: DeepSeek-V3.2 off-policy sequence masking.
- `entropy_threshold` / `high_entropy_mask`: the 80/20 rule (train on high-entropy tokens).
- `entropy_bonus` / `micro_batch_entropy_bonus` / `AdaptiveEntropyCoef`: entropy regularisation
  and its normaliser under micro-batching, Skywork-OR1 adaptive control.
- `bias_corrected_kl`: DeepSeek-V3.2's unbiased KL estimate, KL · π/π_old.

TRL names refer to trl 1.16 `trl/trainer/grpo_trainer.py`. TRL computes the IS correction only
for vLLM rollouts (`use_vllm and vllm_importance_sampling_correction`); grpo_ar applies it to any
sampler whose log-probs were recorded, since top-p, min-p or CFG make even the built-in sampler's
distribution differ from the policy's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor

from .losses import log_ratio
from .registry import Registry


class ISCorrectionFn(Protocol):
    """The signature every `IS_CORRECTIONS` entry shares; bounds are keyword-only options."""

    def __call__(
        self,
        old_logp: Tensor,  # (N, T) log π_old, the trainer's log-prob of the sampling policy
        sampling_logp: Tensor,  # (N, T) the sampler's recorded log-prob (NaN: not scored)
        mask: Tensor,  # (N, T) 1 on completion tokens
        /,
        *args: Any,
        **options: Any,  # c_min, c_max
    ) -> Tensor:  # detached weights, (N, T) per token or (N, 1) per sequence
        ...


IS_CORRECTIONS: Registry[ISCorrectionFn] = Registry("sampler IS correction")


def _check_bounds(c_min: float | None, c_max: float | None, truncate: bool) -> None:
    if truncate and c_min is None and c_max is None:  # nothing to truncate at: a silent no-op
        raise ValueError(
            "a *_truncate IS correction needs c_min or c_max (TRL's default: c_max=3.0)"
        )
    if c_max is not None and c_max <= 0:
        raise ValueError(f"c_max={c_max} must be > 0: IS ratios are positive (TRL's default: 3.0)")
    if c_min is not None and c_max is not None and c_min >= c_max:
        raise ValueError(f"c_min={c_min} must be less than c_max={c_max}")


def _sampler_ratio(old_logp: Tensor, sampling_logp: Tensor, mask: Tensor, sequence: bool) -> Tensor:
    """π_old/π_sampler, (N, T) per token or (N, 1) for the whole sequence.
    Padding and NaN tokens (a sampler that could not score a token) contribute log-ratio 0."""
    diff = torch.where(mask.bool(), old_logp.detach() - sampling_logp.detach(), 0.0)
    diff = torch.nan_to_num(diff, nan=0.0)  # like TRL: ±inf become ±finfo.max, exp gives inf / 0
    if sequence:  # a sum: the product of the token ratios, not GSPO's length-normalised mean
        diff = diff.sum(-1, keepdim=True)
    return torch.exp(diff)


def _truncate(ratio: Tensor, c_min: float | None, c_max: float | None) -> Tensor:
    return torch.clamp(ratio, min=c_min, max=c_max)


def _mask(ratio: Tensor, c_min: float | None, c_max: float | None) -> Tensor:
    lo = -math.inf if c_min is None else c_min
    hi = math.inf if c_max is None else c_max
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


@IS_CORRECTIONS.register("token_truncate")
def token_truncate(
    old_logp: Tensor, sampling_logp: Tensor, mask: Tensor, *,
    c_min: float | None = None, c_max: float | None = 3.0,
) -> Tensor:  # fmt: skip
    """(N, T) clamp(π_old/π_sampler, C_min, C_max) per token: truncated IS (TIS; Yao et al. 2025,
    "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"). TRL
    `vllm_importance_sampling_mode="token_truncate"`."""
    _check_bounds(c_min, c_max, truncate=True)
    return _truncate(_sampler_ratio(old_logp, sampling_logp, mask, False), c_min, c_max)


@IS_CORRECTIONS.register("token_mask")
def token_mask(
    old_logp: Tensor, sampling_logp: Tensor, mask: Tensor, *,
    c_min: float | None = None, c_max: float | None = 3.0,
) -> Tensor:  # fmt: skip
    """(N, T) π_old/π_sampler per token, 0 outside [C_min, C_max]: masked IS (MIS; IcePop, Ring-1T
    arXiv 2510.18855). TRL `"token_mask"`; a missing bound is ±inf."""
    _check_bounds(c_min, c_max, truncate=False)
    return _mask(_sampler_ratio(old_logp, sampling_logp, mask, False), c_min, c_max)


@IS_CORRECTIONS.register("sequence_truncate")
def sequence_truncate(
    old_logp: Tensor, sampling_logp: Tensor, mask: Tensor, *,
    c_min: float | None = None, c_max: float | None = 3.0,
) -> Tensor:  # fmt: skip
    """(N, 1) clamp(Π_t π_old/π_sampler, C_min, C_max): sequence-level TIS. TRL
    `"sequence_truncate"` (the sequence ratio is the product, not a mean)."""
    _check_bounds(c_min, c_max, truncate=True)
    return _truncate(_sampler_ratio(old_logp, sampling_logp, mask, True), c_min, c_max)


@IS_CORRECTIONS.register("sequence_mask")
def sequence_mask(
    old_logp: Tensor, sampling_logp: Tensor, mask: Tensor, *,
    c_min: float | None = None, c_max: float | None = 3.0,
) -> Tensor:  # fmt: skip
    """(N, 1) Π_t π_old/π_sampler, 0 (the whole sequence dropped) outside [C_min, C_max]:
    sequence-level MIS (Liu et al. 2025, "When Speed Kills Stability"). TRL `"sequence_mask"`,
    its default mode."""
    _check_bounds(c_min, c_max, truncate=False)
    return _mask(_sampler_ratio(old_logp, sampling_logp, mask, True), c_min, c_max)


def off_policy_sequence_mask(
    adv: Tensor, logp: Tensor, sampling_logp: Tensor, mask: Tensor, *, threshold: float
) -> Tensor:
    """(N, 1) bool keep: drop a sequence when A < 0 and its mean over completion tokens of
    log π_sampler - log π exceeds δ. DeepSeek-V3.2 arXiv 2512.02556 eq. 9; TRL
    `get_off_policy_mask`. `adv` (N,) or (N, 1); per-token (N, T) advantages give (N, T), as TRL broadcasts.
    NaN tokens count as 0; without a separate sampler pass, pass `old_logp` (as TRL does)."""
    if not threshold >= 0:
        raise ValueError(f"threshold={threshold} must be >= 0 (DeepSeek-V3.2's δ, e.g. 0.5)")
    m = mask.bool()
    kl = torch.nan_to_num(sampling_logp.detach() - logp.detach(), nan=0.0)
    kl = torch.where(m, kl, 0.0).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
    a = adv.unsqueeze(-1) if adv.ndim == 1 else adv
    return (a >= 0) | (kl <= threshold)


def _check_quantile(quantile: float) -> None:
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(
            f"quantile={quantile} must be in [0, 1] (the top fraction kept; 0.2 in 2506.01939)"
        )


def entropy_threshold(entropy: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """() fp32: the (1 - ρ)-quantile of the completion tokens' entropies, linear interpolation as
    `torch.quantile` (bitwise, so TRL's masks are reproduced exactly), without its 2^24-element limit or a host sync. +inf when
    no token is valid, NaN when a valid entropy is NaN. Compute it once over the whole rollout (all
    ranks' tokens) and pass it to `high_entropy_mask` so micro-batching cannot change it."""
    _check_quantile(quantile)
    m = mask.bool().flatten()
    ent = entropy.detach().float().flatten()  # fp32 as TRL: bf16 ties would move the threshold
    # padding sorts last (NaN after it), so sorted[:n] are the n valid values in order
    ordered = torch.where(m, ent, math.inf).sort().values
    n = m.sum()
    q = torch.tensor(1.0 - quantile, dtype=torch.float32, device=ent.device)
    rank = q * (n - 1).clamp(min=0)  # as ATen: q · last_index in fp32, floor, ceil, lerp
    below = rank.long()
    weight = rank - below
    lo = ordered.gather(0, below.reshape(1))
    hi = ordered.gather(0, rank.ceil().long().reshape(1))
    thr = torch.lerp(lo, hi, weight).reshape(())
    thr = torch.where(torch.isnan(ent).logical_and(m).any(), math.nan, thr)
    return torch.where(n == 0, math.inf, thr)


def high_entropy_mask(
    entropy: Tensor,
    mask: Tensor,
    quantile: float | None = None,
    *,
    threshold: Tensor | float | None = None,
) -> Tensor:
    """(N, T) bool: completion tokens whose entropy is ≥ the (1 - ρ)-quantile of the valid tokens
    (ties kept; ρ = 0 keeps the maximum, ρ = 1 every token). The 80/20 rule, arXiv 2506.01939;
    TRL `get_high_entropy_mask(entropies, mask, 1 - top_entropy_quantile)`. Given
    `quantile`, the threshold comes from this call's tokens — as TRL, whose threshold is per
    micro-batch (gathered across processes), so it moves with the micro-batch split; given a
    `threshold` from `entropy_threshold` over the full rollout, it does not."""
    if (quantile is None) == (threshold is None):
        raise ValueError("give exactly one of quantile (ρ, e.g. 0.2) or threshold")
    if threshold is None:
        assert quantile is not None  # exactly one of the two, checked above
        threshold = entropy_threshold(entropy, mask, quantile)
    # TRL compares `entropies * mask.float()`: fp32 for half types, fp64 stays fp64
    ent = entropy.detach().to(torch.promote_types(entropy.dtype, torch.float32))
    return (ent >= threshold) & mask.bool()


def entropy_bonus(entropy: Tensor, mask: Tensor, total_tokens: Tensor | float) -> Tensor:
    """() Σ H_t over `mask` / total_tokens; loss = policy - coef · bonus. `mask` is the set the
    bonus acts on (completion · high-entropy mask, as TRL) and `total_tokens` its size over the
    optimizer step, so micro-batch parts sum to the full-batch mean. TRL divides each
    micro-batch's own mean by the accumulation steps: the same when every micro-batch holds as
    many tokens (pass total_tokens = local count · steps to reproduce it exactly)."""
    return torch.where(mask.bool(), entropy, 0.0).sum() / max(total_tokens, 1)


def micro_batch_entropy_bonus(
    entropy: Tensor,
    mask: Tensor,
    *,
    total_tokens: Tensor | float,
    n_micro: int,
    top_entropy_quantile: float = 1.0,
) -> Tensor:
    """() one micro-batch's part of the optimizer step's entropy bonus (loss - coef · part);
    `mask` (N, T) holds the tokens the bonus acts on, `total_tokens` the step's completion-token
    count over all ranks, `n_micro` the micro-batches of the step on this rank.

    ρ = 1: the bonus acts on every completion token, whose global count is known before the
    pass, so the part is Σ H / total_tokens and the parts sum to the full-batch mean under any
    split. ρ < 1: the 80/20 mask picks tokens per micro-batch (TRL's semantics), so the kept
    set's global size is unknown until every micro-batch has run; the part is then this
    micro-batch's mean / n_micro, TRL's per-micro-batch mean over the accumulation steps."""
    if n_micro < 1:
        raise ValueError(f"n_micro={n_micro}: a step has at least one micro-batch")
    if top_entropy_quantile < 1.0:
        return entropy_bonus(entropy, mask, mask.sum() * n_micro)
    return entropy_bonus(entropy, mask, total_tokens)


class AdaptiveEntropyCoef:
    """The entropy-bonus coefficient, Skywork-OR1 adaptive entropy control (arXiv 2505.22312) as in
    TRL 1.16: `coef` is applied only while the last optimizer step's
    window entropy ≤ target; after each step the coefficient moves ±δ within [min, max]
    (+ when entropy ≤ target). With adaptive=False `coef` is the constant (TRL `entropy_coef`)."""

    def __init__(
        self,
        coef: float = 0.0,
        *,
        target: float = 0.2,
        delta: float = 0.005,
        coef_min: float = 0.0,
        coef_max: float = 1.0,
        adaptive: bool = True,
    ) -> None:
        if delta < 0 or coef_min > coef_max:
            raise ValueError(
                f"need delta >= 0 and coef_min <= coef_max, got {delta}, {coef_min}, {coef_max}"
            )
        self.target, self.delta, self.coef_min, self.coef_max = target, delta, coef_min, coef_max
        self.adaptive = adaptive
        self.value = float(coef)  # the controller's coefficient (TRL self.entropy_coef, logged)
        self.last_entropy = math.inf  # no bonus until a first window is measured (as TRL)
        self._window: Tensor | None = None  # [Σ H, token count] of this optimizer step

    @property
    def coef(self) -> float:
        """The coefficient every micro-batch of the current optimizer step applies."""
        if self.adaptive and not self.last_entropy <= self.target:
            return 0.0
        return self.value

    def observe(self, entropy_sum: Tensor | float, token_count: Tensor | float) -> None:
        """Add one micro-batch's Σ H and token count (over the bonus's mask); no host sync."""
        if not self.adaptive:
            return
        s = torch.as_tensor(entropy_sum, dtype=torch.float64).detach()
        c = torch.as_tensor(token_count, dtype=torch.float64, device=s.device)
        stats = torch.stack([s, c])
        self._window = stats if self._window is None else self._window + stats

    def step(self, reduce: Callable[[Tensor], Tensor] | None = None) -> float:
        """At the optimizer-step boundary: the window's token-weighted mean entropy (after `reduce`,
        e.g. an all-reduce sum of the (2,) [Σ H, count] tensor, called on every rank) updates the
        coefficient; returns that entropy (NaN, and no update, for a window without tokens)."""
        if not self.adaptive:
            return math.nan
        window = torch.zeros(2, dtype=torch.float64) if self._window is None else self._window
        self._window = None
        if reduce is not None:
            window = reduce(window)
        total, count = window.tolist()
        if count <= 0:  # TRL would read 0 / 1 = 0 entropy here and raise the coefficient
            return math.nan
        entropy = total / count
        if entropy <= self.target:
            self.value = min(self.value + self.delta, self.coef_max)
        else:
            self.value = max(self.value - self.delta, self.coef_min)
        self.last_entropy = entropy
        return entropy

    def state_dict(self) -> dict[str, float]:
        """Plain floats; the keys of TRL's `entropy_ctrl_state.json` plus the open window (so a
        TRL state file loads and a resumed run continues mid-step)."""
        window = [0.0, 0.0] if self._window is None else self._window.tolist()
        return {
            "entropy_coef": self.value,
            "last_world_entropy": self.last_entropy,
            "window_entropy_sum": window[0],
            "window_token_count": window[1],
        }

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        """Restore `state_dict()` (or TRL's two-key json: the window is then empty)."""
        self.value = float(state["entropy_coef"])
        self.last_entropy = float(state["last_world_entropy"])
        count = float(state.get("window_token_count", 0.0))
        s = float(state.get("window_entropy_sum", 0.0))
        self._window = torch.tensor([s, count], dtype=torch.float64) if count > 0 else None


def bias_corrected_kl(
    kl: Tensor, logp: Tensor, old_logp: Tensor, mask: Tensor, *, ratio_level: str = "token"
) -> Tensor:
    """(N, T) KL_t · π/π_old, the ratio with its gradient (it changes the KL gradient even where it
    is 1): E_old[r · k3] is unbiased for KL(π || π_ref). DeepSeek-V3.2 arXiv 2512.02556 §3.1; TRL
    `use_bias_correction_kl` (its ratio not detached either). The ratio is per token, or GSPO's
    sequence mean for ratio_level="sequence" (as TRL's importance_sampling_level); on-policy pass
    old_logp = logp.detach()."""
    return kl * torch.exp(log_ratio(logp, old_logp, mask, ratio_level))
