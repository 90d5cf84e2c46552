import pytest

from grpo_ar.core import ADVANTAGES, AGGREGATIONS, KL, LOSSES, Registry, UnknownNameError
from grpo_ar.core.objective import ratio_level


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


def test_registration_facts_are_declared_with_defaults():
    reg = Registry("thing", info={"level": "token"})
    reg.register("a")(lambda: 1)
    reg.register("b", level="sequence")(lambda: 2)
    assert reg.info("a") == {"level": "token"} and reg.info("b") == {"level": "sequence"}
    with pytest.raises(
        TypeError,
        match=r"thing 'c': unknown registration field 'lvl'; this registry declares: level",
    ):
        reg.register("c", lvl="sequence")
    with pytest.raises(UnknownNameError, match="unknown thing 'z'"):
        reg.info("z")


@pytest.mark.parametrize(
    ("loss", "args", "level"),
    [
        ("clip", {}, "token"),
        ("clip", {"ratio_level": "sequence"}, "sequence"),
        ("cispo", {"ratio_level": "sequence"}, "sequence"),
        ("sapo", {}, "token"),
        ("luspo", {}, "sequence"),  # its option's default
        ("gspo", {}, "sequence"),  # declared at registration: no option
        ("gspo_token", {}, "sequence"),
        ("vespo", {}, "sequence"),
        ("clip_cov", {}, "token"),  # the registry's default
        ("kl_cov", {}, "token"),
    ],
)
def test_ratio_level_comes_from_the_loss_option_or_its_registration(loss, args, level):
    assert ratio_level(loss, args) == level


def test_every_loss_has_one_ratio_level_source():
    """A loss declares a level at registration only when it takes no `ratio_level` option:
    the two could disagree otherwise."""
    for name in LOSSES:
        declared = LOSSES.info(name)["ratio_level"] != LOSSES.info_defaults["ratio_level"]
        assert not (declared and "ratio_level" in LOSSES.options(name)), name
