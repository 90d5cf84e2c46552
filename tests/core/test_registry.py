import pytest

from grpo_ar.core import ADVANTAGES, AGGREGATIONS, KL, LOSSES, Registry, UnknownNameError


def test_registries_hold_every_foundation_name():
    assert {"grpo", "dr_grpo", "rloo", "reinforce_pp", "grpo_batch_std"} <= set(ADVANTAGES)
    assert {"k1", "k2", "k3"} <= set(KL)
    assert {"clip", "gspo", "cispo"} <= set(LOSSES)
    assert {"seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"} <= set(AGGREGATIONS)


def test_unknown_key_error_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        LOSSES["ppo2"]
    assert str(err.value).startswith("unknown policy loss 'ppo2'; valid names: cispo, clip")
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)


def test_options_and_check_options():
    assert LOSSES.options("clip") == {
        "eps_low": 0.2,
        "eps_high": 0.2,
        "dual_clip": None,
        "delta": None,
        "ratio_level": "token",
    }  # the caller-supplied `is_weight` input is not an option
    assert LOSSES.takes("clip") == {"is_weight"} and LOSSES.takes("clip_cov") == {
        "is_weight",
        "generator",
    }
    LOSSES.check_options("clip", {"eps_high": 0.28}, "algorithm.loss_args")
    with pytest.raises(
        ValueError,
        match=r"algorithm.loss_args: policy loss 'clip' takes no option 'epsilon'; valid options: delta, dual_clip, eps_high, eps_low, ratio_level",
    ):
        LOSSES.check_options("clip", {"epsilon": 0.2}, "algorithm.loss_args")


def test_duplicate_registration_refused():
    reg = Registry("thing")
    reg.register("a")(lambda: 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(lambda: 2)
