"""grpo scale options, remax, opo, gpg, grpo_passk and GDPO (normalize_then_sum): hand cases,
naive-loop references, failures, zero-spread groups, permutation invariance, reduction identities.

verl references are re-typed from volcengine/verl verl/trainer/ppo/core_algos.py (commit
012be9d9dcb7c38499f23616142870d2682757fc), function by function, as Python loops."""

import math

import pytest
import torch

from grpo_ar.core.advantages import compute_advantages

NAN = float("nan")
TOL = {"atol": 1e-6, "rtol": 0}


def close(a, b):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), **TOL)


def rand(n, seed, dtype=torch.float64):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def permute_within_groups(n, g, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([p * g + torch.randperm(g, generator=gen) for p in range(n // g)])


def valid_of(grp):
    return [x for x in grp if not math.isnan(x)]


def groups(xs, g):
    return [xs[i : i + g] for i in range(0, len(xs), g)]


def mean(xs):
    return sum(xs) / len(xs)


def std(xs):  # unbiased, as torch.std
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# ---- grpo scale = group | batch | none (TRL scale_rewards) ----


def test_grpo_scale_hand_computed():
    r = torch.tensor([0.0, 2.0, 1.0, 1.0])
    # batch: centred [-1, 1, 0, 0] / unbiased std of [0, 2, 1, 1] = sqrt(2/3)
    adv, _ = compute_advantages("grpo", r, 2, scale="batch", eps=0.0)
    close(adv, [-math.sqrt(1.5), math.sqrt(1.5), 0, 0])
    adv, _ = compute_advantages("grpo", r, 2, scale="none")
    close(adv, [-1.0, 1.0, 0, 0])
    adv, _ = compute_advantages("grpo", r, 2, scale="group", eps=0.0)
    s = 1 / std([0.0, 2.0])
    close(adv, [-s, s, 0, 0])


def naive_grpo_batch(rewards, g, eps):
    ok = valid_of(rewards)
    sd = std(ok) if len(ok) > 1 else 0.0
    out = []
    for grp in groups(rewards, g):
        v = valid_of(grp)
        flat = len(v) <= 1 or max(v) == min(v)
        out += [0.0 if math.isnan(x) or flat else (x - mean(v)) / (sd + eps) for x in grp]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grpo_batch_scale_matches_naive_loop_with_failures(dtype):
    r = rand(24, 1, dtype)
    r[[2, 9, 10]] = NAN
    r[12:18] = 0.5  # a zero-spread group
    adv, _ = compute_advantages("grpo", r, 6, scale="batch", eps=1e-4)
    close(adv, naive_grpo_batch(r.tolist(), 6, 1e-4))


def test_grpo_scale_identities():
    r = rand(32, 2)
    r[[3, 17]] = NAN
    r[8:16] = 1.0
    batch, _ = compute_advantages("grpo", r, 8, scale="batch")
    assert torch.equal(batch, compute_advantages("grpo_batch_std", r, 8)[0])
    none, _ = compute_advantages("grpo", r, 8, scale="none")
    assert torch.equal(none, compute_advantages("dr_grpo", r, 8)[0])
    default, _ = compute_advantages("grpo", r, 8)
    assert torch.equal(default, compute_advantages("grpo", r, 8, scale="group")[0])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_scales_permutation_invariant(scale):
    r = rand(24, 3)
    r[5] = NAN
    perm = permute_within_groups(24, 6, 0)
    adv, _ = compute_advantages("grpo", r, 6, scale=scale)
    close(compute_advantages("grpo", r[perm], 6, scale=scale)[0], adv[perm])


def test_batch_scale_with_no_spread_and_zero_eps_is_zero_not_nan():
    for name, kw in [("grpo", {"scale": "batch"}), ("reinforce_pp", {})]:
        adv, _ = compute_advantages(name, torch.full((6,), 2.0), 3, eps=0.0, **kw)
        assert torch.equal(adv, torch.zeros(6))


# ---- remax: r - reward of the greedy rollout (verl compute_remax_outcome_advantage) ----


def test_remax_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 2.0, 1.0, NAN, 3.0])
    base = torch.tensor([0.5, 1.0, NAN])  # the third prompt's greedy reward failed
    adv, valid = compute_advantages("remax", r, 3, baseline=base)
    # an all-equal group still learns against the greedy score; a NaN baseline zeroes its group
    close(adv, [0.5, -0.5, 0.0, 1.0, 1.0, 1.0, 0, 0, 0])
    assert valid.tolist() == [True] * 7 + [False, True]


def naive_remax(rewards, baseline, g):  # verl: returns - reward_baselines, per sample
    return [
        0.0 if math.isnan(x) or math.isnan(b) else x - b
        for grp, b in zip(groups(rewards, g), baseline)
        for x in grp
    ]


def test_remax_matches_naive_loop_and_is_permutation_equivariant():
    r, b = rand(24, 4), rand(4, 5)
    r[[0, 13]] = NAN
    b[2] = NAN
    adv, _ = compute_advantages("remax", r, 6, baseline=b)
    close(adv, naive_remax(r.tolist(), b.tolist(), 6))
    perm = permute_within_groups(24, 6, 1)
    close(compute_advantages("remax", r[perm], 6, baseline=b)[0], adv[perm])


@pytest.mark.parametrize("g", [2, 4, 8])
def test_remax_with_group_mean_baseline_is_dr_grpo(g):
    # bitwise equal here (same reduction); with failures or all-equal groups only up to rounding:
    # dr_grpo's zero-spread test gives exact 0 where r - mean(r) may be one ulp off
    r = rand(8 * g, g, torch.float32)
    adv, _ = compute_advantages("remax", r, g, baseline=r.view(-1, g).mean(1))
    assert torch.equal(adv, compute_advantages("dr_grpo", r, g)[0])
    r[1], r[g : 2 * g] = NAN, 0.1
    adv, _ = compute_advantages("remax", r, g, baseline=r.view(-1, g).nanmean(1))
    close(adv, compute_advantages("dr_grpo", r, g)[0])


# ---- opo: length-weighted optimal baseline (verl compute_opo_outcome_advantage) ----


def test_opo_hand_computed():
    r, lengths = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([1, 3, 2, 2])
    # baseline (1·1 + 3·0 + 2·0 + 2·1) / 8 = 3/8
    adv, _ = compute_advantages("opo", r, 4, lengths=lengths)
    close(adv, [0.625, -0.375, -0.375, 0.625])
    r[1] = NAN  # left out of both sums: (1 + 2) / (1 + 2 + 2) = 0.6
    adv, _ = compute_advantages("opo", r, 4, lengths=lengths)
    close(adv, [0.4, 0.0, -0.6, 0.4])


def naive_opo(rewards, lengths, g):  # verl's loop, minus failed samples
    out = []
    for grp, ls in zip(groups(rewards, g), groups(lengths, g)):
        pairs = [(x, n) for x, n in zip(grp, ls) if not math.isnan(x)]
        v = [x for x, _ in pairs]
        den = sum(n for _, n in pairs)
        if len(v) <= 1 or max(v) == min(v) or den == 0:
            out += [0.0] * g
            continue
        b = sum(x * n for x, n in pairs) / den
        out += [0.0 if math.isnan(x) else x - b for x in grp]
    return out


def test_opo_matches_naive_loop_and_is_permutation_equivariant():
    r = rand(30, 6)
    lengths = torch.randint(1, 50, (30,), generator=torch.Generator().manual_seed(7))
    r[[4, 20, 21]] = NAN
    r[10:15] = 3.0
    lengths[25:30] = 0  # every completion of the last group is empty: no gradient, advantage 0
    adv, _ = compute_advantages("opo", r, 5, lengths=lengths)
    close(adv, naive_opo(r.tolist(), lengths.tolist(), 5))
    assert torch.equal(adv[10:15], torch.zeros(5)) and torch.equal(adv[25:], torch.zeros(5))
    perm = permute_within_groups(30, 5, 2)
    close(compute_advantages("opo", r[perm], 5, lengths=lengths[perm])[0], adv[perm])


def test_opo_with_equal_lengths_is_dr_grpo_and_length_scale_free():
    r = rand(24, 8)
    r[3] = NAN
    lengths = torch.randint(1, 9, (24,), generator=torch.Generator().manual_seed(0))
    close(compute_advantages("opo", r, 6, lengths=torch.full((24,), 7))[0],
          compute_advantages("dr_grpo", r, 6)[0])  # fmt: skip
    close(compute_advantages("opo", r, 6, lengths=lengths * 13)[0],
          compute_advantages("opo", r, 6, lengths=lengths)[0])  # fmt: skip


# ---- gpg: α·(r - mean_g)/F_norm (GPG arXiv 2504.02546; verl compute_gpg_outcome_advantage) ----


def test_gpg_hand_computed():
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1])
    centred = torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    # paper: B = 8, M = 4 samples in the zero-spread group -> α = 2
    close(compute_advantages("gpg", r, 4)[0], 2 * centred)
    # verl: α = 8 / count_nonzero(r) = 8 / 5
    close(compute_advantages("gpg", r, 4, alpha="verl")[0], 1.6 * centred)
    close(compute_advantages("gpg", r, 4, alpha="none", f_norm=0.5)[0], 2 * centred)


def verl_gpg(rewards, g, f_norm=1.0):
    """compute_gpg_outcome_advantage re-typed: alpha = bsz / count_nonzero(scores); one-member
    groups get mean 0 (not reached here: G >= 2)."""
    scores = torch.tensor(rewards, dtype=torch.float64)
    alpha = len(rewards) / max(int(torch.count_nonzero(scores)), 1)
    out = []
    for grp in groups(rewards, g):
        m = torch.stack([torch.tensor(x, dtype=torch.float64) for x in grp]).mean().item()
        out += [alpha * (x - m) / f_norm for x in grp]
    return out


def test_gpg_verl_alpha_matches_verl_loop():
    r = (rand(32, 9) > 0.3).double() * rand(32, 10).abs()  # sparse non-zero rewards
    r[8:16] = 0.0  # a zero-spread group (verl: exactly 0 too: mean of zeros is 0)
    adv, _ = compute_advantages("gpg", r, 8, alpha="verl", f_norm=2.0)
    close(adv, verl_gpg(r.tolist(), 8, f_norm=2.0))


def naive_gpg_paper(rewards, g):
    informative = 0
    out = []
    for grp in groups(rewards, g):
        v = valid_of(grp)
        flat = len(v) <= 1 or max(v) == min(v)
        informative += 0 if flat else len(v)
        out += [0.0 if math.isnan(x) or flat else x - mean(v) for x in grp]
    alpha = len(rewards) / max(informative, 1)
    return [alpha * a for a in out]


def test_gpg_paper_alpha_matches_naive_loop_with_failures():
    r = rand(30, 11)
    r[[1, 7, 8, 9, 10]] = NAN  # group 2 keeps one valid sample: no spread
    r[20:25] = 1.0
    adv, _ = compute_advantages("gpg", r, 5)
    close(adv, naive_gpg_paper(r.tolist(), 5))
    perm = permute_within_groups(30, 5, 3)
    close(compute_advantages("gpg", r[perm], 5)[0], adv[perm])
    # no zero-spread group and no failure: α = 1 and gpg is dr_grpo
    r = rand(30, 12)
    assert torch.equal(compute_advantages("gpg", r, 5)[0], compute_advantages("dr_grpo", r, 5)[0])


@pytest.mark.parametrize(
    "opts, match",
    [({"alpha": 1.0}, "gpg alpha=1.0: use 'paper' or 'verl' or 'none'"),
     ({"f_norm": 0.0}, r"gpg f_norm=0.0: need > 0")],
)  # fmt: skip
def test_gpg_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        compute_advantages("gpg", torch.zeros(4), 2, **opts)


# ---- grpo_passk: only the best sample learns (verl compute_grpo_passk_outcome_advantage) ----


def test_grpo_passk_hand_computed():
    r = torch.tensor([0.2, 0.9, 0.5, 0.1, 1.0, 1.0, 0.0, 0.0])
    # group 1: 0.9 - 0.5 = 0.4 over std([.2,.9,.5,.1]) = sqrt(0.3875/3); group 2: tie -> all 0
    adv, _ = compute_advantages("grpo_passk", r, 4, eps=0.0)
    close(adv, [0, 0.4 / math.sqrt(0.3875 / 3), 0, 0, 0, 0, 0, 0])
    close(compute_advantages("grpo_passk", r, 4, scale_by_std=False)[0], [0, 0.4, 0, 0, 0, 0, 0, 0])
    r[1] = NAN  # the failed best leaves the statistics: 0.5 - 0.2 over std([.2, .5, .1])
    adv, _ = compute_advantages("grpo_passk", r, 4, eps=0.0)
    close(adv, [0, 0, 0.3 / std([0.2, 0.5, 0.1]), 0, 0, 0, 0, 0])


def verl_passk(rewards, g, eps=1e-6, norm=True):
    """compute_grpo_passk_outcome_advantage re-typed (per group: topk 2, the argmax gets the gap)."""
    out = [0.0] * len(rewards)
    for p, grp in enumerate(groups(rewards, g)):
        t = torch.tensor(grp, dtype=torch.float64)
        top, idx = torch.topk(t, 2)
        gap = (top[0] - top[1]).item()
        out[p * g + idx[0].item()] = gap / (t.std().item() + eps) if norm else gap
    return out


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_passk_matches_verl_loop(norm):
    r = rand(40, 13)
    adv, _ = compute_advantages("grpo_passk", r, 8, scale_by_std=norm)
    close(adv, verl_passk(r.tolist(), 8, norm=norm))
    perm = permute_within_groups(40, 8, 4)
    close(compute_advantages("grpo_passk", r[perm], 8, scale_by_std=norm)[0], adv[perm])


def test_grpo_passk_one_valid_member_is_zero():
    r = torch.tensor([NAN, 3.0, NAN, NAN, 1.0, 2.0])
    adv, _ = compute_advantages("grpo_passk", r, 3)
    close(adv, [0, 0, 0, 0, 0, 1.0 / (std([1.0, 2.0]) + 1e-6)])


# ---- normalize_then_sum (GDPO arXiv 2601.05242) ----


def gdpo(components, weights, g, total=None, **kw):
    comp, w = torch.as_tensor(components), torch.as_tensor(weights)
    if total is None:
        total = (comp.nan_to_num() * w).sum(1)
    return compute_advantages(
        "grpo", total, g, components=comp, weights=w, multi_objective="normalize_then_sum", **kw
    )


def test_gdpo_hand_computed_keeps_what_grpo_collapses():
    comp = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    w = torch.ones(4, 2)
    # GRPO on the sums [2, 0 | 1, 0] gives both groups the same ±1/√2: the combinations collapse
    grpo_adv, _ = compute_advantages("grpo", (comp * w).sum(1), 2, eps=0.0)
    close(grpo_adv, [math.sqrt(0.5), -math.sqrt(0.5)] * 2)
    # GDPO: z-scores ±1/√2 per varying reward -> sums [√2, -√2, 1/√2, -1/√2], batch std √(5/3)
    adv, valid = gdpo(comp, w, 2, eps=0.0)
    close(adv, [math.sqrt(6 / 5), -math.sqrt(6 / 5), math.sqrt(3 / 10), -math.sqrt(3 / 10)])
    assert valid.all()


def naive_gdpo(comp, w, total, g, eps):
    n, k = len(comp), len(comp[0])
    valid = [
        not math.isnan(total[i]) and not any(w[i][j] != 0 and math.isnan(comp[i][j]) for j in range(k))
        for i in range(n)
    ]  # fmt: skip
    s = [0.0] * n
    for p in range(n // g):
        rows = range(p * g, (p + 1) * g)
        for j in range(k):
            use = [i for i in rows if valid[i] and w[i][j] != 0]
            v = [comp[i][j] for i in use]
            if len(v) <= 1 or max(v) == min(v):
                continue
            for i in use:
                s[i] += w[i][j] * (comp[i][j] - mean(v)) / (std(v) + eps)
    ok = [s[i] for i in range(n) if valid[i]]
    sd = std(ok) if len(ok) > 1 else 0.0
    return [x / (sd + eps) if valid[i] else 0.0 for i, x in enumerate(s)], valid


def messy_components(seed=14):
    gen = torch.Generator().manual_seed(seed)
    comp = torch.randn(24, 3, generator=gen, dtype=torch.float64)
    w = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64).repeat(24, 1)
    comp[:, 0] = (comp[:, 0] > 0).double()  # a binary reward
    comp[0:6, 0] = 1.0  # ... with no spread in group 0
    comp[6:12, 2], w[6:12, 2] = NAN, 0.0  # group 1's entry does not use reward 2
    w[12:18, 1] = 0.0  # reward 1 only monitors group 2 ...
    comp[13, 1] = NAN  # ... so its failure spares the sample
    comp[19, 2] = NAN  # a weighted failure: sample 19 is invalid
    total = (comp.nan_to_num() * w).sum(1)
    total[19] = NAN  # as RewardComputer reports it
    return comp, w, total


def test_gdpo_matches_naive_loop_with_failures_and_unused_rewards():
    comp, w, total = messy_components()
    adv, valid = gdpo(comp, w, 6, total=total, eps=1e-4)
    exp, exp_valid = naive_gdpo(comp.tolist(), w.tolist(), total.tolist(), 6, 1e-4)
    close(adv, exp)
    assert valid.tolist() == exp_valid and valid.sum() == 23 and adv[19] == 0
    # whatever hides behind a failure or an unused reward, nothing changes
    for garbage in (0.0, -5.0, 1e6):
        adv2, _ = gdpo(torch.nan_to_num(comp, nan=garbage), w, 6, total=total, eps=1e-4)
        close(adv2, adv)


def test_gdpo_permutation_equivariant_and_zero_spread_exact():
    comp, w, total = messy_components(15)
    adv, _ = gdpo(comp, w, 6, total=total)
    perm = permute_within_groups(24, 6, 5)
    close(gdpo(comp[perm], w[perm], 6, total=total[perm])[0], adv[perm])
    comp[6:12] = torch.tensor([0.3, 7.0, NAN], dtype=torch.float64)  # no spread in any reward
    adv, _ = gdpo(comp, w, 6, total=total)
    assert torch.equal(adv[6:12], torch.zeros(6, dtype=adv.dtype))


def test_gdpo_with_one_reward_is_grpo_up_to_one_batch_factor():
    # not equal to GRPO: GDPO divides the GRPO z-scores once more by their batch std (L2798-2799),
    # which is sqrt(P(G-1)/(PG-1)) ≈ 0.95 here, not 1. The direction per sample is GRPO's.
    r = rand(32, 16)
    r[8:16] = 2.0
    z, _ = compute_advantages("grpo", r, 8)
    adv, _ = gdpo(r[:, None], torch.ones(32, 1, dtype=r.dtype), 8)
    close(adv, z / (z.std() + 1e-4))
    assert torch.equal(adv[8:16], torch.zeros(8, dtype=adv.dtype))
    # a positive weight on the single reward changes nothing beyond eps
    close(gdpo(r[:, None], torch.full((32, 1), 3.0, dtype=r.dtype), 8, eps=0.0)[0],
          gdpo(r[:, None], torch.ones(32, 1, dtype=r.dtype), 8, eps=0.0)[0])  # fmt: skip


@pytest.mark.parametrize(
    "name, kw, match",
    [
        ("rloo", {}, "defined for advantage='grpo' only.*'rloo'.*use multi_objective='sum_then_"),
        ("grpo", {"scale": "batch"}, "fixes its own scaling.*drop scale='batch'"),
        ("grpo", {"f_norm": 1.0}, "'grpo' takes no option 'f_norm'"),
    ],
)
def test_gdpo_refuses_what_it_does_not_define(name, kw, match):
    comp = torch.ones(4, 2)
    with pytest.raises(ValueError, match=match):
        compute_advantages(name, comp.sum(1), 2, components=comp, weights=comp,
                           multi_objective="normalize_then_sum", **kw)  # fmt: skip


def test_gdpo_needs_components_of_the_right_shape():
    r = torch.zeros(4)
    with pytest.raises(ValueError, match="needs `components` and `weights`.*RewardResult"):
        compute_advantages("grpo", r, 2, multi_objective="normalize_then_sum")
    with pytest.raises(ValueError, match=r"components \(4, 2\) and weights \(4, 3\)"):
        compute_advantages("grpo", r, 2, components=torch.zeros(4, 2), weights=torch.zeros(4, 3),
                           multi_objective="normalize_then_sum")  # fmt: skip


def test_sum_then_normalize_ignores_components():
    r = rand(8, 17)
    adv, _ = compute_advantages(
        "grpo", r, 4, components=torch.zeros(8, 2), weights=torch.ones(8, 2)
    )
    assert torch.equal(adv, compute_advantages("grpo", r, 4)[0])
