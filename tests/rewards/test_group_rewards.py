"""Group-level rewards: hand-computed values, a naive per-group reference, credit assignment,
failure isolation per group, and the sum with per-sample rewards in `RewardComputer`."""

import math

import pytest
import torch

from grpo_ar import group_reward
from grpo_ar.core.advantages import ADVANTAGES
from grpo_ar.rewards import RewardComputer, RewardContext, RewardRegistry, RewardSpecError
from grpo_ar.rewards.group import distinct_n, entropy, levenshtein
from grpo_ar.types import Entry, RewardSpec


def ctx_of(entries, group_size):
    rows = [e for e in entries for _ in range(group_size)]
    gids = [g for g in range(len(entries)) for _ in range(group_size)]
    return RewardContext(rows, gids, group_size, 0)


def entry(*specs):
    return Entry("p", tuple(RewardSpec(n, w, a) for n, w, a in specs))


def close(got, want):
    torch.testing.assert_close(
        torch.as_tensor(got, dtype=torch.float64),
        torch.as_tensor(want, dtype=torch.float64),
        atol=1e-6,
        rtol=0,
        equal_nan=True,
    )


def test_group_entropy_by_hand_shared_and_leave_one_out():
    e = entry(("group_entropy", 1.0, {"credit": "shared"}))
    r = RewardComputer()(["1", " 1", "2", "3"], ctx_of([e], 4))
    h = 1.5 * math.log(2)  # {1: .5, 2: .25, 3: .25}
    close(r.total, [h] * 4)
    e = entry(("group_entropy", 1.0, {}))  # loo by default
    r = RewardComputer()(["1", "1", "2", "3"], ctx_of([e], 4))
    without_1, without_2 = math.log(3), -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    close(r.total, [h - without_1, h - without_1, h - without_2, h - without_2])
    # normalised by ln(categories), answers read by a pattern; no match is one 'invalid' answer
    e = entry(("group_entropy", 1.0, {"credit": "shared", "categories": 10, "pattern": r"\d"}))
    r = RewardComputer()(["a7", "x", "y", "8"], ctx_of([e], 4))
    close(r.total, [1.5 * math.log(2) / math.log(10)] * 4)


def naive_entropy_loo(group):
    def h(xs):
        n = len(xs)
        return -sum(xs.count(k) / n * math.log(xs.count(k) / n) for k in set(xs))

    return [h(group) - h(group[:i] + group[i + 1 :]) for i in range(len(group))]


def test_batch_of_groups_equals_a_naive_loop_over_groups():
    g = torch.Generator().manual_seed(0)
    outs = [str(int(d)) for d in torch.randint(0, 4, (5 * 6,), generator=g)]
    e = entry(("group_entropy", 1.0, {}))
    r = RewardComputer()(outs, ctx_of([e] * 5, 6))
    want = [v for p in range(5) for v in naive_entropy_loo(outs[p * 6 : (p + 1) * 6])]
    close(r.total, want)


def test_loo_credit_gives_the_rare_answer_the_largest_grpo_advantage():
    # a group that has collapsed onto "3" but for one member: GRPO must push towards "5";
    # a shared group value would give every member the same reward and advantage 0
    outs = ["3"] * 7 + ["5"]
    for credit, nonzero in (("loo", True), ("shared", False)):
        e = entry(("group_entropy", 1.0, {"credit": credit}))
        r = RewardComputer()(outs, ctx_of([e], 8))
        adv = ADVANTAGES["grpo"](r.total.double(), torch.ones(8, dtype=torch.bool), 8)
        assert bool(adv.abs().max() > 0.1) is nonzero
    e = entry(("group_entropy", 1.0, {}))
    total = RewardComputer()(outs, ctx_of([e], 8)).total.double()
    adv = ADVANTAGES["grpo"](total, torch.ones(8, dtype=torch.bool), 8)
    assert int(adv.argmax()) == 7 and bool((adv[:7] < 0).all())


def test_distinct_n_and_pairwise_distance_by_hand():
    assert distinct_n([["a", "b", "c"], ["a", "b", "d"]], 2) == 3 / 4
    assert distinct_n([["a"]], 2) == 0.0
    assert levenshtein("kitten", "sitting") == 3
    e = entry(("distinct_n", 1.0, {"n": 1, "credit": "shared"}))
    close(RewardComputer()(["a b", "a c"], ctx_of([e], 2)).total, [0.75, 0.75])
    e = entry(("distinct_n", 1.0, {"n": 1}))  # whole 3/6; without 0: 2/4; without 1 or 2: 3/4
    close(RewardComputer()(["a b", "a c", "a c"], ctx_of([e], 3)).total, [0.0, -0.25, -0.25])
    e = entry(("pairwise_distance", 1.0, {}))
    got = RewardComputer()(["abc", "abd", "xyz"], ctx_of([e], 3)).total
    close(got, [(1 / 3 + 1) / 2, (1 / 3 + 1) / 2, 1.0])
    e = entry(("pairwise_distance", 1.0, {"metric": "l2"}))
    outs = [torch.tensor([0.0, 0.0]), torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0])]
    close(RewardComputer()(outs, ctx_of([e], 3)).total, [2.5, 5.0, 2.5])


def test_group_rewards_sum_with_per_sample_rewards_and_fail_per_group():
    reg = RewardRegistry()

    @reg.register("exact")
    def exact(outputs, args, ctx):
        return [float(o == a["answer"]) for o, a in zip(outputs, args)]

    @reg.register("spread")
    @group_reward
    def spread(outputs, *, bonus: float = 0.0):
        if "boom" in outputs:
            raise RuntimeError("this group breaks")
        if "short" in outputs:
            return [1.0]  # wrong length: the group fails
        return len(set(outputs)) + bonus  # a scalar: every member gets it

    specs = [("exact", 1.0, {"answer": "x"}), ("spread", 0.5, {"bonus": 1.0})]
    entries = [entry(*specs)] * 4
    outs = ["x", "y", "x", "x", "boom", "x", "short", "z"]
    r = RewardComputer(registry=reg)(outs, ctx_of(entries, 2))
    nan = math.nan
    close(r.total, [1 + 0.5 * 3, 0.5 * 3, 1 + 0.5 * 2, 1 + 0.5 * 2, nan, nan, nan, nan])
    k = r.names.index("exact")
    close(r.components[:, k], [1, 0, 1, 1, 0, 1, 0, 0])  # per-sample reward unaffected
    assert r.failures["spread"] == 4


def test_groups_are_found_by_group_id_when_only_some_samples_use_the_reward():
    # entry 0 asks only for the per-sample reward; the group reward sees group 1 alone
    a, b = entry(("exact_answer", 1.0, {"answer": "1"})), entry(("group_entropy", 1.0, {}))
    r = RewardComputer()(["1", "2", "1", "1", "2", "3"], ctx_of([a, b], 3))
    close(r.total, [1, 0, 1, *naive_entropy_loo(["1", "2", "3"])])


def test_bad_arguments_are_refused_at_validation():
    with pytest.raises(RewardSpecError, match="credit='mean'"):
        RewardComputer().validate([entry(("group_entropy", 1.0, {"credit": "mean"}))])
    with pytest.raises(RewardSpecError, match="metric='hamming'"):
        RewardComputer().validate([entry(("pairwise_distance", 1.0, {"metric": "hamming"}))])
    with pytest.raises(TypeError, match="group_outputs"):
        group_reward(lambda outputs, args: 0.0)
    assert entropy(["a"] * 3) == 0.0
