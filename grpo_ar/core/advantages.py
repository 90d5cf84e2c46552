"""Advantage estimators: (N,) rewards of contiguous groups -> (N,) advantages.

Every entry has the signature `fn(rewards, valid, group_size, *, inputs, options)`: `rewards` has
no NaN (failed rewards arrive as 0 with `valid == False`), invalid samples are left out of every
statistic and get advantage 0, and a group whose valid rewards are all equal gets exactly 0 from
every group-relative estimator. Keyword-only `lengths` (N,) and `baseline` (P,) are inputs the
caller supplies (`ADVANTAGES.takes(name)`); the other keyword-only parameters are user options.
Call `compute_advantages`, which prepares all of them and aggregates several rewards.
verl names refer to volcengine/verl verl/trainer/ppo/core_algos.py (commit 012be9d).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from einops import rearrange
from torch import Tensor

from .registry import Registry


class AdvantageFn(Protocol):
    """The signature every `ADVANTAGES` entry shares."""

    def __call__(
        self,
        rewards: Tensor,  # (N,) rewards of contiguous groups, 0 where invalid (never NaN)
        valid: Tensor,  # (N,) bool: the reward was computed (invalid samples get advantage 0)
        group_size: int,  # G; N = P·G
        /,
        *args: Any,
        **options: Any,  # user options, plus the inputs `lengths` / `baseline` / `subgroups` it takes
    ) -> Tensor:  # (N,) advantages
        ...


ADVANTAGES: Registry[AdvantageFn] = Registry(
    "advantage estimator", inputs=("lengths", "baseline", "subgroups")
)

MULTI_OBJECTIVE = ("sum_then_normalize", "normalize_then_sum")
"""How several rewards become one advantage (TRL 1.16 `multi_objective_aggregation`)."""
SCALES = ("group", "batch", "none")
"""`grpo`'s `scale` option (TRL 1.16 `scale_rewards`)."""
GPG_ALPHAS = ("paper", "verl", "none")
"""`gpg`'s `alpha` option."""

_INPUT_HELP = {
    "baseline": "the reward of one greedy rollout per prompt, shape (P,) = ({p},); the sampler "
    "must provide greedy baselines (ReMax)",
    "lengths": "the token count of each completion, shape (N,) = ({n},)",
    "subgroups": "the tree sub-groups of each completion, shape (N, K) with N = {n} (tree "
    "sampling records them; optional)",
}
OPTIONAL_INPUTS = ("subgroups",)
"""Inputs an entry copes without (`treepo` without a tree is `grpo`)."""


def _choice(what: str, value: Any, choices: tuple[str, ...], hint: str = "") -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{what}={value!r}: use {' or '.join(map(repr, choices))}{hint}")


def _group_stats(r: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(P, G, ...) rewards and validity -> per-group count, mean, unbiased std, zero-spread flag,
    each (P, 1, ...): the statistics run over dim 1 (a trailing K axis holds several rewards)."""
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


def _grouped(rewards: Tensor, valid: Tensor, group_size: int) -> tuple[Tensor, ...]:
    """(N,) -> (P, G) rewards and validity, plus `_group_stats` of them."""
    r, v = (rearrange(t, "(p g) -> p g", g=group_size) for t in (rewards, valid))
    return (r, v, *_group_stats(r, v))


def _batch_std(x: Tensor, v: Tensor) -> Tensor:
    """Unbiased std of the valid entries of x (any shape), 0 when fewer than two."""
    vf = v.to(x.dtype)
    n = vf.sum()
    mean = (x * vf).sum() / n.clamp(min=1)
    return ((((x - mean) * vf) ** 2).sum() / (n - 1).clamp(min=1)).sqrt()


def _batch_scaled(x: Tensor, v: Tensor, eps: float, of: Tensor | None = None) -> Tensor:
    """x / (batch std of `of` (default x) + eps); a batch with no spread stays 0 even at eps=0."""
    d = _batch_std(x if of is None else of, v) + eps
    return x / torch.where(d > 0, d, torch.ones_like(d))


@ADVANTAGES.register("dr_grpo")
def dr_grpo(rewards: Tensor, valid: Tensor, group_size: int) -> Tensor:
    """r - mean_g, no std division. Dr. GRPO, arXiv 2503.20783 §3."""
    r, v, _, mean, _, flat = _grouped(rewards, valid, group_size)
    adv = torch.where(v & ~flat, r - mean, torch.zeros_like(r))
    return rearrange(adv, "p g -> (p g)")


@ADVANTAGES.register("grpo")
def grpo(
    rewards: Tensor, valid: Tensor, group_size: int, *, eps: float = 1e-4, scale: str = "group"
) -> Tensor:
    """(r - mean_g) / (std + eps), std of the group ("group": DeepSeekMath arXiv 2402.03300
    §4.1.2), of the whole batch ("batch": Lite PPO arXiv 2508.08221) or no division ("none":
    Dr. GRPO). TRL 1.16 `scale_rewards`: unbiased stds, eps 1e-4."""
    _choice("grpo scale", scale, SCALES, " (TRL scale_rewards=True/False is 'group'/'none')")
    if scale == "none":
        return dr_grpo(rewards, valid, group_size)
    if scale == "batch":  # the batch std of the rewards themselves, not of the centred ones
        return _batch_scaled(dr_grpo(rewards, valid, group_size), valid, eps, of=rewards)
    r, v, _, mean, std, flat = _grouped(rewards, valid, group_size)
    adv = torch.where(v & ~flat, (r - mean) / (std + eps), torch.zeros_like(r))
    return rearrange(adv, "p g -> (p g)")


@ADVANTAGES.register("grpo_batch_std")
def grpo_batch_std(rewards: Tensor, valid: Tensor, group_size: int, *, eps: float = 1e-4) -> Tensor:
    """Lite PPO's name (arXiv 2508.08221) for grpo with scale="batch": group mean, batch std."""
    return grpo(rewards, valid, group_size, eps=eps, scale="batch")


@ADVANTAGES.register("rloo")
def rloo(rewards: Tensor, valid: Tensor, group_size: int) -> Tensor:
    """r_i - mean of the other valid members of the group. RLOO, arXiv 2402.14740 eq. (3)."""
    r, v, n, mean, _, flat = _grouped(rewards, valid, group_size)
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
    return _batch_scaled(dr_grpo(rewards, valid, group_size), valid, eps)


@ADVANTAGES.register("remax")
def remax(rewards: Tensor, valid: Tensor, group_size: int, *, baseline: Tensor) -> Tensor:
    """r - b_p, b_p (P,) the reward of one greedy rollout of prompt p. ReMax, arXiv 2310.10505
    Alg. 1; verl core_algos.py `compute_remax_outcome_advantage` (outcome reward: returns = r).

    The baseline is external, so a group whose samples all score alike still learns against the
    greedy score (0 only where r == b). A failed greedy reward (NaN) gives its group 0.
    """
    r, v = (rearrange(t, "(p g) -> p g", g=group_size) for t in (rewards, valid))
    b = rearrange(baseline.to(r.dtype), "p -> p 1")
    adv = torch.where(v & torch.isfinite(b), r - b, torch.zeros_like(r))
    return rearrange(adv, "p g -> (p g)")


@ADVANTAGES.register("opo")
def opo(rewards: Tensor, valid: Tensor, group_size: int, *, lengths: Tensor) -> Tensor:
    """r - Σ l·r / Σ l over the group's valid samples: the length-weighted optimal baseline.
    OPO, arXiv 2505.23585; verl core_algos.py `compute_opo_outcome_advantage`. `lengths` (N,)
    are completion token counts (>= 0); a group whose valid lengths sum to 0 gets 0."""
    r, v, _, _, _, flat = _grouped(rewards, valid, group_size)
    w = rearrange(lengths.to(r.dtype), "(p g) -> p g", g=group_size) * v.to(r.dtype)
    den = w.sum(1, keepdim=True)
    base = (w * r).sum(1, keepdim=True) / torch.where(den > 0, den, torch.ones_like(den))
    adv = torch.where(v & ~flat & (den > 0), r - base, torch.zeros_like(r))
    return rearrange(adv, "p g -> (p g)")


@ADVANTAGES.register("gpg")
def gpg(
    rewards: Tensor, valid: Tensor, group_size: int, *, f_norm: float = 1.0, alpha: str = "paper"
) -> Tensor:
    """α·(r - mean_g)/F_norm. GPG, arXiv 2504.02546 (its "accurate gradient estimation").

    alpha="paper": α = B/(B - M), M the samples whose group has no reward spread (their advantage
    is 0; failed samples count in M too), so the batch-mean loss is not diluted by them.
    alpha="verl": α = B / #(r != 0), verl core_algos.py `compute_gpg_outcome_advantage`
    (`m = torch.count_nonzero(scores)`), which counts non-zero rewards instead. "none": α = 1.
    """
    _choice("gpg alpha", alpha, GPG_ALPHAS)
    if not f_norm > 0:
        raise ValueError(f"gpg f_norm={f_norm}: need > 0 (the paper uses 1)")
    r, v, _, mean, _, flat = _grouped(rewards, valid, group_size)
    adv = torch.where(v & ~flat, (r - mean) / f_norm, torch.zeros_like(r))
    counted = {"paper": v & ~flat, "verl": v & (r != 0), "none": torch.ones_like(v)}[alpha]
    a = r.new_tensor(rewards.numel()) / counted.sum().clamp(min=1).to(r.dtype)
    return rearrange(a * adv, "p g -> (p g)")


@ADVANTAGES.register("grpo_passk")
def grpo_passk(
    rewards: Tensor,
    valid: Tensor,
    group_size: int,
    *,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Only the group's best sample learns: (r_max - r_2nd) / (std_g + eps), the others 0: the
    leave-one-out gradient of pass@G. verl core_algos.py `compute_grpo_passk_outcome_advantage`
    (its `norm_adv_by_std_in_grpo`, epsilon 1e-6; its docstring cites arXiv 2503.19595). Not the
    closed-form pass@k advantage of Pass@k Training (arXiv 2508.10751), a different estimator."""
    r, v, _, _, std, flat = _grouped(rewards, valid, group_size)
    if group_size < 2:
        return torch.zeros_like(rewards)
    masked = torch.where(v, r, torch.full_like(r, torch.finfo(r.dtype).min))
    top, idx = masked.topk(2, dim=1)  # (P, 2); a tie for the best gives a gap of 0
    gap = top[:, :1] - top[:, 1:]  # overflows only where < 2 are valid, i.e. `flat`
    if scale_by_std:
        gap = gap / (std + eps)
    best = torch.zeros_like(v).scatter(1, idx[:, :1], True)
    adv = torch.where(best & v & ~flat, gap, torch.zeros_like(r))
    return rearrange(adv, "p g -> (p g)")


def _gdpo(
    rewards: Tensor, components: Tensor, weights: Tensor, group_size: int, eps: float
) -> tuple[Tensor, Tensor]:
    """GDPO, arXiv 2601.05242: z-score each reward in its group, weighted sum, divide by the batch
    std of the sum. TRL 1.16 `normalize_then_sum`.

    A reward with weight 0 (unused by the entry, or monitoring only) takes no part. A sample is
    valid iff `rewards` (the weighted total) is finite and none of its weighted rewards failed:
    the same samples as `sum_then_normalize` trains on. Each reward's statistics run over the
    group's valid samples. TRL subtracts the batch mean of the sum; that mean is 0 by
    construction (each group's z-scores sum to 0), so it is skipped and a group with no spread in
    any reward stays exactly 0.
    """
    used = weights != 0
    valid = torch.isfinite(rewards) & ~(used & torch.isnan(components)).any(1)
    vk = valid[:, None] & used
    c = torch.where(vk, components, torch.zeros_like(components)).to(rewards.dtype)
    c3, v3 = (rearrange(t, "(p g) k -> p g k", g=group_size) for t in (c, vk))
    _, mean, std, flat = _group_stats(c3, v3)
    z = torch.where(v3 & ~flat, (c3 - mean) / (std + eps), torch.zeros_like(c3))
    s = (rearrange(z, "p g k -> (p g) k") * weights.to(rewards.dtype)).sum(1)
    return _batch_scaled(s, valid, eps), valid


def _check_gdpo(
    name: str,
    components: Tensor | None,
    weights: Tensor | None,
    n: int,
    options: dict[str, Any],
) -> None:
    if name != "grpo":
        raise ValueError(
            f"multi_objective='normalize_then_sum' (GDPO) is defined for advantage='grpo' only "
            f"(per-reward group z-scores, weighted sum, batch std); advantage={name!r} sums the "
            "rewards first: use multi_objective='sum_then_normalize' with it"
        )
    ADVANTAGES.check_options("grpo", options, "normalize_then_sum")
    if options.get("scale", "group") != "group":
        raise ValueError(
            f"multi_objective='normalize_then_sum' (GDPO) fixes its own scaling (each reward by "
            f"its group std, the sum by the batch std); drop scale={options['scale']!r} or use "
            "multi_objective='sum_then_normalize'"
        )
    if components is None or weights is None:
        raise ValueError(
            "multi_objective='normalize_then_sum' needs `components` and `weights` (N, K): "
            "each reward of each sample and its weight (RewardResult.components / .weights)"
        )
    if components.ndim != 2 or components.shape[0] != n or components.shape != weights.shape:
        raise ValueError(
            f"components {tuple(components.shape)} and weights {tuple(weights.shape)} must both "
            f"be (N, K) with N = {n}"
        )


def _inputs(
    name: str, n: int, group_size: int, given: dict[str, Tensor | None]
) -> dict[str, Tensor]:
    """The caller-supplied tensors entry `name` takes, checked for presence and shape."""
    shapes = {"lengths": (n,), "baseline": (n // group_size,)}
    out = {}
    for key in sorted(ADVANTAGES.takes(name)):
        x = given.get(key)
        need = _INPUT_HELP[key].format(p=n // group_size, n=n)
        if x is None and key in OPTIONAL_INPUTS:
            continue
        if x is None:
            raise ValueError(f"advantage estimator {name!r} needs `{key}`: {need}")
        if tuple(x.shape)[: 1 if key == "subgroups" else None] != shapes.get(key, (n,)):
            raise ValueError(f"`{key}` has shape {tuple(x.shape)}; {name!r} needs {need}")
        out[key] = x
    return out


def compute_advantages(
    name: str,
    rewards: Tensor,
    group_size: int,
    *,
    lengths: Tensor | None = None,
    baseline: Tensor | None = None,
    components: Tensor | None = None,
    weights: Tensor | None = None,
    multi_objective: str = "sum_then_normalize",
    subgroups: Tensor | None = None,
    **options: Any,
) -> tuple[Tensor, Tensor]:
    """(N,) rewards, NaN = failed -> ((N,) advantages, (N,) bool validity).

    `lengths` (N,) completion token counts and `baseline` (P,) greedy-rollout rewards go to the
    entries that take them (ADVANTAGES.takes), `components`/`weights` (N, K) (RewardResult) to
    multi_objective="normalize_then_sum" (GDPO); "sum_then_normalize" uses `rewards` alone.
    """
    fn = ADVANTAGES[name]
    n = rewards.numel()
    if rewards.ndim != 1 or group_size < 1 or n % group_size:
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}"
        )
    _choice("multi_objective", multi_objective, MULTI_OBJECTIVE)
    given = {"lengths": lengths, "baseline": baseline, "subgroups": subgroups}
    inputs = _inputs(name, n, group_size, given)
    if multi_objective == "normalize_then_sum":
        _check_gdpo(name, components, weights, n, options)
        assert components is not None and weights is not None  # _check_gdpo refuses None
        eps = options.get("eps", ADVANTAGES.options("grpo")["eps"])
        return _gdpo(rewards, components, weights, group_size, eps)
    valid = torch.isfinite(rewards)
    clean = torch.where(valid, rewards, torch.zeros_like(rewards))
    return fn(clean, valid, group_size, **inputs, **options), valid


def check_advantages(
    name: str, group_size: int, multi_objective: str = "sum_then_normalize", **options: Any
) -> None:
    """Run the estimator once on a tiny synthetic batch, so a refused name, option value or
    combination raises ValueError at config time, not mid-run."""
    p = 2
    rewards = torch.linspace(0, 1, p * group_size)
    try:
        compute_advantages(
            name,
            rewards,
            group_size,
            lengths=torch.ones(p * group_size),
            baseline=torch.zeros(p),
            components=torch.stack([rewards, 1 - rewards], 1),
            weights=torch.ones(p * group_size, 2),
            multi_objective=multi_objective,
            **options,
        )
    except TypeError as e:  # an option the entry does not take
        raise ValueError(f"advantage estimator {name!r}: {e}") from None
