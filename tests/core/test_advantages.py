import math

import pytest
import torch

from grpo_ar.core.advantages import (
    ADVANTAGES,
    MULTI_OBJECTIVE,
    SCALES,
    check_advantages,
    compute_advantages,
)

NAN = float("nan")


def inputs(name, rewards, g):
    """The caller-supplied tensors `name` takes: token counts 1..5 and, for ReMax, the first
    member's reward as the greedy baseline (so an all-equal group has r == baseline)."""
    given = {
        "lengths": torch.arange(rewards.numel()) % 5 + 1,
        "baseline": rewards.reshape(-1, g)[:, 0].clone(),
        "subgroups": None,  # optional (treepo); a tree's are tested in test_tree_advantages
    }
    return {k: given[k] for k in ADVANTAGES.takes(name)}


def test_grpo_hand_computed():
    # group 1: [1, 0, 0, 1] mean .5, unbiased std sqrt(1/3); group 2 all equal
    adv, valid = compute_advantages("grpo", torch.tensor([1.0, 0, 0, 1, 3, 3, 3, 3]), 4, eps=0.0)
    s = 0.5 / math.sqrt(1 / 3)
    expected = torch.tensor([s, -s, -s, s, 0, 0, 0, 0])
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)
    assert valid.all()


def test_dr_grpo_and_rloo_hand_computed():
    r = torch.tensor([1.0, 2.0, 6.0])
    adv, _ = compute_advantages("dr_grpo", r, 3)
    torch.testing.assert_close(adv, torch.tensor([-2.0, -1.0, 3.0]), atol=1e-6, rtol=0)
    adv, _ = compute_advantages("rloo", r, 3)
    # r_i - mean(others): 1 - 4, 2 - 3.5, 6 - 1.5
    torch.testing.assert_close(adv, torch.tensor([-3.0, -1.5, 4.5]), atol=1e-6, rtol=0)


def test_batch_scaled_hand_computed():
    r = torch.tensor([0.0, 2.0, 1.0, 1.0])
    std = torch.tensor([0.0, 2.0, 1.0, 1.0]).std()  # unbiased, over the batch
    adv, _ = compute_advantages("grpo_batch_std", r, 2, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 0, 0]) / std, atol=1e-6, rtol=0)
    adv, _ = compute_advantages("reinforce_pp", r, 2, eps=0.0)
    centred = torch.tensor([-1.0, 1.0, 0, 0])
    torch.testing.assert_close(adv, centred / centred.std(), atol=1e-6, rtol=0)


def naive_grpo(rewards, g, eps):
    out = []
    for p in range(len(rewards) // g):
        grp = rewards[p * g : (p + 1) * g]
        ok = [x for x in grp if not math.isnan(x)]
        mean = sum(ok) / max(len(ok), 1)
        std = math.sqrt(sum((x - mean) ** 2 for x in ok) / max(len(ok) - 1, 1))
        for x in grp:
            flat = len(ok) <= 1 or max(ok) == min(ok)
            out.append(0.0 if math.isnan(x) or flat else (x - mean) / (std + eps))
    return torch.tensor(out)


def test_grpo_matches_naive_loop_with_failures():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(24, generator=g)
    r[[1, 7, 8, 9, 10, 11]] = NAN  # group 2 is one valid sample only
    adv, valid = compute_advantages("grpo", r, 6, eps=1e-6)
    torch.testing.assert_close(adv, naive_grpo(r.tolist(), 6, 1e-6), atol=1e-6, rtol=0)
    assert valid.tolist() == [not math.isnan(x) for x in r.tolist()]


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_nan_rewards_excluded_from_statistics(name):
    r = torch.tensor([1.0, 0.0, 0.5, 2.0, NAN, 0.0, 4.0, 1.0, 3.0])
    adv, valid = compute_advantages(name, r, 3, **inputs(name, r, 3))
    assert torch.isfinite(adv).all()
    assert adv[4] == 0 and valid.tolist() == [True] * 4 + [False] + [True] * 4
    # whatever value hides behind an invalid sample, no statistic sees it
    for garbage in (0.0, -3.0, 1e6):
        clean = torch.nan_to_num(r, nan=garbage)
        direct = ADVANTAGES[name](clean, valid, 3, **inputs(name, r, 3))
        torch.testing.assert_close(direct, adv, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
@pytest.mark.parametrize("value", [0.0, 0.1, 7.3, -1e6])
def test_equal_rewards_give_exact_zero(name, value):
    r = torch.cat([torch.full((4,), value), torch.tensor([0.0, 1.0, 2.0, 5.0])])
    adv, _ = compute_advantages(name, r, 4, **inputs(name, r, 4))
    assert torch.equal(adv[:4], torch.zeros(4))
    assert torch.isfinite(adv).all()


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_all_failed_batch_is_zero_not_nan(name):
    r = torch.full((6,), NAN)
    adv, valid = compute_advantages(name, r, 3, **inputs(name, r, 3))
    assert torch.equal(adv, torch.zeros(6)) and not valid.any()


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sweep_shape_dtype_finite(name, dtype):
    r = torch.randn(32, dtype=dtype)
    adv, valid = compute_advantages(name, r, 8, **inputs(name, r, 8))
    assert adv.shape == (32,) and adv.dtype == dtype and valid.dtype == torch.bool
    assert torch.isfinite(adv).all()


def test_indivisible_batch_raises():
    with pytest.raises(ValueError, match="groups of 4"):
        compute_advantages("grpo", torch.zeros(6), 4)


def test_unknown_name_lists_valid():
    with pytest.raises(KeyError, match="valid names: .*dr_grpo.*grpo"):
        compute_advantages("ppo_gae", torch.zeros(4), 2)


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_every_entry_passes_its_config_check(name):
    check_advantages(name, 4, **ADVANTAGES.options(name))


def test_registry_inputs_are_not_options():
    assert ADVANTAGES.takes("remax") == {"baseline"} and ADVANTAGES.takes("opo") == {"lengths"}
    assert ADVANTAGES.takes("grpo") == frozenset()
    assert ADVANTAGES.options("remax") == {} and ADVANTAGES.options("opo") == {}
    assert ADVANTAGES.options("grpo") == {"eps": 1e-4, "scale": "group"}
    assert ADVANTAGES.options("gpg") == {"f_norm": 1.0, "alpha": "paper"}
    assert ADVANTAGES.options("grpo_passk") == {"scale_by_std": True, "eps": 1e-6}
    assert MULTI_OBJECTIVE == ("sum_then_normalize", "normalize_then_sum")
    assert SCALES == ("group", "batch", "none")


def test_missing_input_says_who_must_provide_it():
    r = torch.tensor([1.0, 0.0, 2.0, 2.0])
    with pytest.raises(ValueError, match=r"'remax' needs `baseline`.*sampler must provide greedy"):
        compute_advantages("remax", r, 2)
    with pytest.raises(ValueError, match=r"'opo' needs `lengths`: the token count.*\(4,\)"):
        compute_advantages("opo", r, 2)
    with pytest.raises(ValueError, match=r"`baseline` has shape \(4,\); 'remax' needs .*\(2,\)"):
        compute_advantages("remax", r, 2, baseline=r)
    # an input the entry does not take is ignored (the trainer may pass what it has)
    adv, _ = compute_advantages("grpo", r, 2, baseline=torch.zeros(2), lengths=torch.ones(4))
    torch.testing.assert_close(adv, compute_advantages("grpo", r, 2)[0], atol=0, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scale": "groups"}, "grpo scale='groups': use 'group' or 'batch' or 'none'"),
        ({"scale": True}, "scale_rewards=True/False is 'group'/'none'"),
        ({"multi_objective": "mean"}, "multi_objective='mean': use 'sum_then_normalize' or"),
    ],
)
def test_bad_option_values_raise_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_advantages("grpo", torch.zeros(4), 2, **kwargs)
    with pytest.raises(ValueError, match=match):
        check_advantages("grpo", 2, **kwargs)


def test_check_advantages_turns_unknown_option_into_value_error():
    with pytest.raises(ValueError, match="'rloo'.*unexpected keyword argument 'eps'"):
        check_advantages("rloo", 4, eps=1e-4)
