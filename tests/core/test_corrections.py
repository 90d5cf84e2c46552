"""grpo_ar.core.corrections: hand cases, naive-loop references, padding leaks, gradients."""

import math

import pytest
import torch

from grpo_ar.core.aggregation import AGGREGATIONS
from grpo_ar.core.corrections import (
    IS_CORRECTIONS,
    AdaptiveEntropyCoef,
    bias_corrected_kl,
    entropy_bonus,
    entropy_threshold,
    high_entropy_mask,
    micro_batch_entropy_bonus,
    off_policy_sequence_mask,
)
from grpo_ar.core.kl import KL

ATOL = 1e-6
GARBAGE = (math.nan, math.inf, -math.inf, 1e30, -1e30)


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def batch(seed=0, n=6, t=9, noise=0.5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -4 * torch.rand(n, t, generator=g, dtype=torch.float64)
    old = logp + noise * torch.randn(n, t, generator=g, dtype=torch.float64)
    sampling = old + noise * torch.randn(n, t, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    lengths[0], lengths[1] = 1, t
    mask = (torch.arange(t) < lengths[:, None]).long()
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    ent = 3 * torch.rand(n, t, generator=g, dtype=torch.float64)
    return tuple(x.to(dtype) for x in (logp, old, sampling, adv, ent)) + (mask,)


def fill_padding(x, mask, seed=1):
    """x with garbage (NaN, ±inf, ±1e30) under mask == 0."""
    g = torch.Generator().manual_seed(seed)
    junk = torch.tensor(GARBAGE, dtype=x.dtype)[torch.randint(0, 5, x.shape, generator=g)]
    return torch.where(mask.bool(), x, junk)


# ---------------------------------------------------------------- sampler IS correction


def test_is_hand_computed():
    # log π_old/π_sampler per token: log 2, log 0.25, log 4 | log 0.5, (padding)
    sampling = torch.zeros(2, 3)
    old = torch.tensor([[math.log(2), math.log(0.25), math.log(4)], [math.log(0.5), 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    f = IS_CORRECTIONS
    close(f["token_truncate"](old, sampling, mask), torch.tensor([[2, 0.25, 3], [0.5, 1, 1]]))
    close(
        f["token_truncate"](old, sampling, mask, c_min=0.6),
        torch.tensor([[2, 0.6, 3], [0.6, 1, 1]]),
    )
    close(f["token_mask"](old, sampling, mask), torch.tensor([[2, 0.25, 0], [0.5, 1, 1]]))
    close(f["token_mask"](old, sampling, mask, c_min=0.6), torch.tensor([[2.0, 0, 0], [0, 1, 1]]))
    # the sequence ratio is the product of token ratios: 2 · 0.25 · 4 = 2, and 0.5
    close(f["sequence_truncate"](old, sampling, mask), torch.tensor([[2.0], [0.5]]))
    close(f["sequence_truncate"](old, sampling, mask, c_max=1.5), torch.tensor([[1.5], [0.5]]))
    close(f["sequence_mask"](old, sampling, mask, c_max=1.5), torch.tensor([[0.0], [0.5]]))
    close(f["sequence_mask"](old, sampling, mask, c_min=0.6), torch.tensor([[2.0], [0.0]]))
    # a bound that is hit exactly is inside: [C_min, C_max] is closed (on-policy r = 1 exactly)
    assert f["token_mask"](old, old, mask, c_min=1.0, c_max=2.0).eq(1).all()
    assert f["sequence_mask"](old, old, mask, c_max=1.0).eq(1).all()
    # mask modes with no bounds are plain IS (TRL allows it; only *_truncate needs a bound)
    close(
        f["token_mask"](old, sampling, mask, c_min=None, c_max=None),
        torch.tensor([[2, 0.25, 4], [0.5, 1, 1]]),
    )


def naive_is(old, sampling, mask, name, c_min, c_max):
    level, kind = name.split("_")
    lo = -math.inf if c_min is None else c_min
    hi = math.inf if c_max is None else c_max

    def bound(r):
        if kind == "truncate":
            return min(max(r, lo), hi)
        return r if lo <= r <= hi else 0.0

    def diff(i, t):
        d = float(old[i, t] - sampling[i, t]) if mask[i, t] else 0.0
        return 0.0 if math.isnan(d) else d

    n, width = old.shape
    if level == "token":
        rows = [[bound(math.exp(diff(i, t))) for t in range(width)] for i in range(n)]
    else:
        rows = [[bound(math.exp(sum(diff(i, t) for t in range(width))))] for i in range(n)]
    return torch.tensor(rows, dtype=torch.float64)


BOUNDS = [(None, 3.0), (0.5, 2.0), (0.9, None), (None, None)]


IS_CASES = [  # a *_truncate without any bound is refused: see test_is_bad_bounds
    (name, b) for name in sorted(IS_CORRECTIONS) for b in BOUNDS
    if not (b == (None, None) and name.endswith("truncate"))
]  # fmt: skip


@pytest.mark.parametrize("name, bounds", IS_CASES, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_is_matches_naive_loop(name, bounds, seed):
    _, old, sampling, _, _, mask = batch(seed, noise=0.3)
    sampling[2, 0] = math.nan  # a token the sampler could not score: no correction
    got = IS_CORRECTIONS[name](old, sampling, mask, c_min=bounds[0], c_max=bounds[1])
    close(got, naive_is(old, sampling, mask, name, *bounds))
    assert got.shape == (old.shape[0], 1 if name.startswith("sequence") else old.shape[1])


@pytest.mark.parametrize("name", sorted(IS_CORRECTIONS))
def test_is_padding_does_not_leak_and_weights_are_detached(name):
    _, old, sampling, _, _, mask = batch(2)
    old = old.requires_grad_(True)
    sampling = sampling.requires_grad_(True)
    clean = IS_CORRECTIONS[name](old, sampling, mask, c_min=0.5)
    dirty = IS_CORRECTIONS[name](fill_padding(old, mask), fill_padding(sampling, mask, 2), mask)
    dirty_min = IS_CORRECTIONS[name](
        fill_padding(old, mask), fill_padding(sampling, mask, 2), mask, c_min=0.5
    )
    assert torch.equal(clean, dirty_min) and torch.isfinite(dirty).all()
    assert not clean.requires_grad and clean.grad_fn is None


@pytest.mark.parametrize("name", sorted(IS_CORRECTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_is_sweep_dtype_and_extremes(name, dtype):
    _, old, sampling, _, _, mask = batch(
        3, noise=30.0, dtype=dtype
    )  # exp overflows: bounded anyway
    w = IS_CORRECTIONS[name](old, sampling, mask)
    assert w.dtype == dtype and torch.isfinite(w).all() and (w >= 0).all() and (w <= 3).all()
    assert IS_CORRECTIONS.options(name) == {"c_min": None, "c_max": 3.0}  # TRL's defaults
    # on-policy (sampler == trainer) the correction is exactly 1
    assert torch.equal(IS_CORRECTIONS[name](old, old, mask), torch.ones_like(w))


@pytest.mark.parametrize(
    "name, kw, msg",
    [
        ("token_truncate", {"c_min": None, "c_max": None}, "needs c_min or c_max"),
        ("sequence_truncate", {"c_min": None, "c_max": None}, "needs c_min or c_max"),
        ("token_mask", {"c_min": 2.0, "c_max": 2.0}, "must be less than"),
        ("sequence_mask", {"c_max": 0.0}, "must be > 0"),
    ],
)
def test_is_bad_bounds(name, kw, msg):
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=msg):
        IS_CORRECTIONS[name](x, x, torch.ones(1, 2), **kw)


# ---------------------------------------------------------------- off-policy sequence mask


def test_off_policy_hand_computed():
    logp = torch.zeros(4, 2)
    # mean log π_sampler/π per sequence: 0.6, 0.6, 0.5, 0.4 (row 3 has one padded token)
    sampling = torch.tensor([[0.6, 0.6], [0.2, 1.0], [0.5, 0.5], [0.4, 9.0]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0]])
    adv = torch.tensor([1.0, -1.0, -1.0, -1.0])
    keep = off_policy_sequence_mask(adv, logp, sampling, mask, threshold=0.5)
    # A ≥ 0 always kept; A < 0 kept iff KL ≤ δ (0.5 is kept)
    assert keep.tolist() == [[True], [False], [True], [True]]
    assert off_policy_sequence_mask(adv[:, None], logp, sampling, mask, threshold=0.5).shape == (
        4,
        1,
    )
    tok = off_policy_sequence_mask(adv[:, None].expand(4, 2), logp, sampling, mask, threshold=0.5)
    assert tok.shape == (4, 2) and tok.tolist() == keep.expand(4, 2).tolist()
    assert off_policy_sequence_mask(torch.zeros(4), logp, sampling, mask, threshold=0.0).all()


def test_off_policy_matches_loop_ignores_padding_and_nan():
    logp, _, sampling, adv, _, mask = batch(4, noise=0.7)
    sampling = sampling + torch.tensor([0.5, 0, 0.0, 0, 0, 1.5], dtype=sampling.dtype)[:, None]
    adv = adv.abs() * torch.tensor([-1.0, 1, -1, -1, 1, -1], dtype=adv.dtype)
    sampling[1, 3] = math.nan  # unscorable token: no KL evidence
    keep = off_policy_sequence_mask(adv, logp, sampling, mask, threshold=0.1)
    for i in range(len(adv)):
        d = [float(sampling[i, t] - logp[i, t]) for t in range(mask.shape[1]) if mask[i, t]]
        kl = sum(0.0 if math.isnan(x) else x for x in d) / max(len(d), 1)
        assert bool(keep[i, 0]) == (adv[i] >= 0 or kl <= 0.1)
    dirty = off_policy_sequence_mask(
        adv, fill_padding(logp, mask), fill_padding(sampling, mask, 3), mask, threshold=0.1
    )
    assert torch.equal(keep, dirty) and not keep.all() and keep.any()
    with pytest.raises(ValueError, match="threshold"):
        off_policy_sequence_mask(adv, logp, sampling, mask, threshold=-1.0)


# ---------------------------------------------------------------- 80/20 high-entropy mask


def test_high_entropy_hand_computed_and_ties():
    ent = torch.tensor([[0.1, 0.5, 0.9], [0.3, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # valid sorted: 0.1 0.3 0.5 0.9; ρ = 0.5: rank 0.5·3 = 1.5 -> 0.3 + 0.5·0.2 = 0.4
    close(entropy_threshold(ent, mask, 0.5), torch.tensor(0.4))
    assert high_entropy_mask(ent, mask, 0.5).tolist() == [
        [False, True, True],
        [False, False, False],
    ]
    assert high_entropy_mask(ent, mask, 1.0).tolist() == mask.bool().tolist()  # ρ = 1: all
    assert high_entropy_mask(ent, mask, 0.0).sum() == 1  # ρ = 0: the maximum only
    ties = torch.tensor([[1.0, 1.0, 1.0, 2.0]])
    one = torch.ones(1, 4)
    close(entropy_threshold(ties, one, 0.25), torch.tensor(1.25))  # rank 2.25: lerp(1, 2, 0.25)
    assert high_entropy_mask(ties, one, 0.25).tolist() == [[False, False, False, True]]
    assert high_entropy_mask(ties, one, 0.5).all()  # threshold 1.0 exactly: ≥ keeps every tie
    assert high_entropy_mask(ties, one, 0.0).tolist() == [[False, False, False, True]]


def naive_threshold(ent, mask, rho):
    vals = sorted(float(e) for e, m in zip(ent.flatten(), mask.flatten()) if m)
    pos = (1 - rho) * (len(vals) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return vals[lo] + (pos - lo) * (vals[hi] - vals[lo])


@pytest.mark.parametrize("rho", [0.0, 0.2, 0.37, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_high_entropy_matches_loop_and_torch_quantile(rho, seed):
    _, _, _, _, ent, mask = batch(seed, n=7, t=11, dtype=torch.float32)
    if seed == 2:
        ent = (ent * 2).round() / 2  # many ties
    thr = entropy_threshold(ent, mask, rho)
    assert torch.equal(thr, torch.quantile(ent[mask.bool()], 1 - rho))  # bitwise
    close(thr.double(), torch.tensor(naive_threshold(ent, mask, rho), dtype=torch.float64))
    keep = high_entropy_mask(ent, mask, rho)
    loop = [
        [bool(mask[i, t]) and float(ent[i, t]) >= float(thr) for t in range(ent.shape[1])]
        for i in range(ent.shape[0])
    ]
    assert keep.tolist() == loop
    n_valid = int(mask.sum())
    assert keep.sum() >= n_valid - math.ceil((1 - rho) * (n_valid - 1)) - 1  # about the top ρ


def test_high_entropy_padding_all_masked_and_nan():
    _, _, _, _, ent, mask = batch(5)
    dirty = fill_padding(ent, mask)
    assert torch.equal(entropy_threshold(dirty, mask, 0.2), entropy_threshold(ent, mask, 0.2))
    assert torch.equal(high_entropy_mask(dirty, mask, 0.2), high_entropy_mask(ent, mask, 0.2))
    none = torch.zeros_like(mask)
    assert entropy_threshold(ent, none, 0.2) == math.inf
    assert not high_entropy_mask(ent, none, 0.2).any()
    ent[0, 0] = math.nan  # torch.quantile gives NaN, so TRL keeps nothing
    assert torch.isnan(entropy_threshold(ent, mask, 0.2))
    assert not high_entropy_mask(ent, mask, 0.2).any()
    with pytest.raises(ValueError, match="quantile"):
        high_entropy_mask(ent, mask, 1.5)
    with pytest.raises(ValueError, match="exactly one"):
        high_entropy_mask(ent, mask, 0.2, threshold=1.0)


def test_high_entropy_threshold_of_the_whole_rollout_is_split_invariant():
    """A per-micro-batch quantile (TRL's) moves with the split; a rollout-wide threshold does not."""
    _, _, _, _, ent, mask = batch(6, n=8, t=10)
    ent[:4] *= 0.2  # the first micro-batch holds the low-entropy sequences
    full = high_entropy_mask(ent, mask, 0.2)
    halves = [slice(0, 4), slice(4, 8)]
    local = torch.cat([high_entropy_mask(ent[s], mask[s], 0.2) for s in halves])
    assert not torch.equal(local, full)  # micro-batching changed which tokens train
    thr = entropy_threshold(ent, mask, 0.2)
    split = torch.cat([high_entropy_mask(ent[s], mask[s], threshold=thr) for s in halves])
    assert torch.equal(split, full)
    assert torch.equal(high_entropy_mask(ent, mask, threshold=float(thr)), full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_high_entropy_dtypes(dtype):
    _, _, _, _, ent, mask = batch(7, dtype=dtype)
    keep = high_entropy_mask(ent.requires_grad_(True), mask, 0.2)
    assert keep.dtype == torch.bool and keep.shape == ent.shape and keep.any()
    assert entropy_threshold(ent, mask, 0.2).dtype == torch.float32


# ---------------------------------------------------------------- entropy bonus


def test_entropy_bonus_hand_computed_and_gradient():
    ent = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    bonus = entropy_bonus(ent, mask, 3)
    close(bonus, torch.tensor(2.0))  # (1 + 2 + 3) / 3
    bonus.backward()
    close(ent.grad, mask / 3.0)


def test_entropy_bonus_micro_batches_sum_to_the_full_batch_and_ignore_padding():
    _, _, _, _, ent, mask = batch(8, n=8)
    mask[:4, 3:] = 0  # the micro-batches hold different token counts
    ent[:4] *= 0.5
    total = int(mask.sum())
    full = entropy_bonus(ent, mask, total)
    close(full, ent[mask.bool()].mean())
    parts = sum(entropy_bonus(ent[s], mask[s], total) for s in (slice(0, 4), slice(4, 8)))
    close(parts, full)
    # TRL's per-micro-batch mean / steps is a different number when counts differ
    trl = sum(ent[s][mask[s].bool()].mean() / 2 for s in (slice(0, 4), slice(4, 8)))
    assert abs(float(trl - full)) > 1e-3
    assert torch.equal(entropy_bonus(fill_padding(ent, mask), mask, total), full)


def test_micro_batch_entropy_bonus_hand_computed():
    """ρ = 1: Σ H / the step's token count. ρ < 1: this micro-batch's mean / n_micro."""
    ent = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # every token counts: (1 + 2 + 3) / 12 tokens in the whole step, whatever n_micro says
    all_tokens = micro_batch_entropy_bonus(ent, mask, total_tokens=12, n_micro=4)
    close(all_tokens, torch.tensor(0.5))
    # an entropy mask: the micro-batch's mean 2.0 over 2 micro-batches (TRL's mean / steps)
    selected = micro_batch_entropy_bonus(
        ent, mask, total_tokens=12, n_micro=2, top_entropy_quantile=0.2
    )
    close(selected, torch.tensor(1.0))
    one = micro_batch_entropy_bonus(ent, mask, total_tokens=12, n_micro=1, top_entropy_quantile=0.2)
    close(one, torch.tensor(2.0))
    with pytest.raises(ValueError, match="n_micro=0"):
        micro_batch_entropy_bonus(ent, mask, total_tokens=12, n_micro=0)


def test_micro_batch_entropy_bonus_parts_sum_as_the_step_defines():
    """Parts over micro-batches sum to the full-batch mean (ρ = 1) or to the mean of the
    micro-batch means (ρ < 1, unequal token counts: a different number)."""
    _, _, _, _, ent, mask = batch(8, n=8)
    mask[:4, 3:] = 0
    ent[:4] *= 0.5
    halves = (slice(0, 4), slice(4, 8))
    total = int(mask.sum())
    full = sum(
        micro_batch_entropy_bonus(ent[s], mask[s], total_tokens=total, n_micro=2) for s in halves
    )
    close(full, ent[mask.bool()].mean())
    per_micro = sum(
        micro_batch_entropy_bonus(
            ent[s], mask[s], total_tokens=total, n_micro=2, top_entropy_quantile=0.5
        )
        for s in halves
    )
    naive = (ent[:4][mask[:4].bool()].mean() + ent[4:][mask[4:].bool()].mean()) / 2
    close(per_micro, naive)
    assert abs(float(per_micro - full)) > 1e-3


# ---------------------------------------------------------------- adaptive entropy coefficient


def test_adaptive_entropy_hand_sequence():
    ctl = AdaptiveEntropyCoef(0.2, target=0.5, delta=0.1, coef_min=0.05, coef_max=0.35)
    assert ctl.coef == 0.0  # no window measured yet: last entropy is +inf
    ctl.observe(torch.tensor(1.0), torch.tensor(1.0))  # micro-batch 1: H = 1.0 on 1 token
    ctl.observe(torch.tensor(0.8), 9)  # micro-batch 2: Σ H = 0.8 on 9 tokens
    assert ctl.coef == 0.0  # the coefficient only changes at the optimizer step
    assert ctl.step() == pytest.approx(0.18)  # token-weighted: 1.8 / 10
    assert ctl.value == pytest.approx(0.3) and ctl.coef == pytest.approx(0.3)
    ctl.observe(0.4, 1)
    ctl.step()
    assert ctl.value == pytest.approx(0.35)  # capped at coef_max
    ctl.observe(6.0, 10)
    assert ctl.step() == pytest.approx(0.6)
    assert ctl.value == pytest.approx(0.25) and ctl.coef == 0.0  # above target: gated off
    for _ in range(5):
        ctl.observe(6.0, 10)
        ctl.step()
    assert ctl.value == pytest.approx(0.05)  # floored at coef_min
    ctl.observe(5.0, 10)  # exactly the target: counts as "≤ target"
    ctl.step()
    assert ctl.value == pytest.approx(0.15) and ctl.coef == pytest.approx(0.15)


def test_adaptive_entropy_empty_window_reduce_and_static():
    ctl = AdaptiveEntropyCoef(0.1, target=1.0, delta=0.1)
    assert math.isnan(ctl.step())  # no tokens: no evidence, no update (TRL would read 0)
    assert ctl.value == 0.1 and ctl.last_entropy == math.inf
    # another rank saw Σ H = 30 over 10 tokens: the all-reduced window decides
    ctl.observe(1.0, 10)
    assert ctl.step(reduce=lambda w: w + torch.tensor([30.0, 10.0], dtype=w.dtype)) == 1.55
    assert ctl.value == pytest.approx(0.0) and ctl.coef == 0.0
    static = AdaptiveEntropyCoef(0.01, adaptive=False)
    static.observe(0.0, 5)
    assert math.isnan(static.step()) and static.coef == 0.01 and static.value == 0.01
    with pytest.raises(ValueError, match="coef_min <= coef_max"):
        AdaptiveEntropyCoef(coef_min=0.5, coef_max=0.1)


def test_adaptive_entropy_state_dict_round_trip():
    ctl = AdaptiveEntropyCoef(0.2, target=0.5, delta=0.1)
    ctl.observe(0.3, 1)
    ctl.step()
    ctl.observe(torch.tensor(2.0), torch.tensor(4.0))  # an open window
    state = ctl.state_dict()
    assert all(type(v) is float for v in state.values())
    other = AdaptiveEntropyCoef(0.0, target=0.5, delta=0.1)
    other.load_state_dict(state)
    assert other.state_dict() == state and other.coef == ctl.coef
    assert other.step() == ctl.step() == 0.5
    assert other.state_dict() == ctl.state_dict()
    trl_json = {"entropy_coef": 0.4, "last_world_entropy": 0.9}  # TRL entropy_ctrl_state.json
    other.load_state_dict(trl_json)
    assert other.value == 0.4 and other.coef == 0.0 and math.isnan(other.step())


# ---------------------------------------------------------------- bias-corrected KL


def test_bias_corrected_kl_hand_and_gradient():
    logp = torch.tensor([[math.log(0.4), math.log(0.1)]], requires_grad=True)
    old = torch.tensor([[math.log(0.2), math.log(0.1)]])
    kl = torch.tensor([[0.5, 0.3]])
    out = bias_corrected_kl(kl, logp, old, torch.ones(1, 2))
    close(out, torch.tensor([[1.0, 0.3]]))  # ratios 2 and 1
    out.sum().backward()
    close(logp.grad, torch.tensor([[1.0, 0.3]]))  # ∂(kl·r)/∂logp = kl·r: the ratio is not detached
    # sequence level: r = exp(mean(log 2, 0)) = √2 on every token
    seq = bias_corrected_kl(kl, logp, old, torch.ones(1, 2), ratio_level="sequence")
    close(seq, kl * math.sqrt(2))
    with pytest.raises(ValueError, match="ratio_level"):
        bias_corrected_kl(kl, logp, old, torch.ones(1, 2), ratio_level="tokens")


def test_bias_corrected_kl_on_policy_keeps_gradient():
    logp0, _, _, _, _, mask = batch(9)
    ref = logp0 + 0.3
    logp = logp0.clone().requires_grad_(True)
    kl = KL["k3"](logp, ref)
    out = bias_corrected_kl(kl, logp, logp.detach(), mask)
    close(out, kl)  # value unchanged on-policy
    (g_corr,) = torch.autograd.grad(out.sum(), logp)
    (g_plain,) = torch.autograd.grad(KL["k3"](logp, ref).sum(), logp)
    close(g_corr, g_plain + kl.detach())  # + kl · ∂r/∂logp with r = 1


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_bias_corrected_kl_loop_and_padding(level):
    logp, old, _, _, _, mask = batch(10)
    kl = KL["k3"](logp, old - 0.2)
    out = bias_corrected_kl(kl, logp, old, mask, ratio_level=level)
    for i in range(mask.shape[0]):
        valid = [t for t in range(mask.shape[1]) if mask[i, t]]
        seq = math.exp(sum(float(logp[i, t] - old[i, t]) for t in valid) / len(valid))
        for t in valid:
            r = math.exp(float(logp[i, t] - old[i, t])) if level == "token" else seq
            assert out[i, t].item() == pytest.approx(float(kl[i, t]) * r, abs=ATOL, rel=0)
    dirty = bias_corrected_kl(
        fill_padding(kl, mask), fill_padding(logp, mask), fill_padding(old, mask, 4), mask,
        ratio_level=level,
    )  # fmt: skip
    agg = AGGREGATIONS["token_mean"]
    close(agg(dirty, mask, int(mask.sum()), 6, 9), agg(out, mask, int(mask.sum()), 6, 9))
    assert torch.equal(dirty[mask.bool()], out[mask.bool()])
