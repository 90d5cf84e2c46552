import logging
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from grpo_ar.errors import DataError
from grpo_ar.rewards import (
    REWARDS,
    RewardComputer,
    RewardContext,
    RewardRegistry,
    RewardSpecError,
    UnknownRewardError,
    build_rewards,
    metrics,
    per_sample,
    reward_metrics,
    validate_specs,
)
from grpo_ar.types import Entry, RewardSpec

nan = math.nan


def spec(name, weight=1.0, **args):
    return RewardSpec(name, weight, args)


def ctx_of(entries, group_size, step=0, lengths=None):
    """Each entry repeated group_size times, groups contiguous."""
    rows = [e for e in entries for _ in range(group_size)]
    gids = [g for g in range(len(entries)) for _ in range(group_size)]
    return RewardContext(rows, gids, group_size, step, lengths)


def close(t, expected):
    torch.testing.assert_close(t, torch.tensor(expected), atol=1e-6, rtol=0, equal_nan=True)


@pytest.fixture
def reg():
    r = RewardRegistry()
    calls = []

    @r.register("length")
    @per_sample
    def length(output, *, scale=1.0):
        return len(output) * scale

    @r.register("const", ("value",))
    def const(outputs, args, ctx):
        calls.append(("const", list(outputs), list(ctx.group_ids)))
        return [a["value"] for a in args]

    @r.register("unique_in_group")
    def unique_in_group(outputs, args, ctx):
        """1 for an output no other member of its group produced (a group-level reward)."""
        calls.append(("unique", list(outputs), list(ctx.group_ids)))
        return [
            float(sum(o == p and g == h for p, h in zip(outputs, ctx.group_ids)) == 1)
            for o, g in zip(outputs, ctx.group_ids)
        ]

    @r.register("boom")
    def boom(outputs, args, ctx):
        raise RuntimeError("judge server down")

    @r.register("short")
    def short(outputs, args, ctx):
        return [1.0] * (len(outputs) - 1)

    @r.register("spotty")
    def spotty(outputs, args, ctx):
        return [[1.0, None, nan, math.inf, "7", True][i % 6] for i in range(len(outputs))]

    @r.register("counter")
    class Counter:
        def __init__(self, start=0):
            self.value, self.steps = start, []

        def __call__(self, outputs, args, ctx):
            return [float(self.value)] * len(outputs)

        def on_iteration_end(self, step):
            self.steps.append(step)
            self.value += 1

    r.calls = calls
    return r


def test_per_sample_derives_args_and_lifts_to_batches(reg):
    assert reg["length"].required == () and reg["length"].defaults == {"scale": 1.0}
    assert reg["const"].required == ("value",) and reg["const"].defaults is None
    assert reg.options("length") == {"scale": 1.0}

    @per_sample
    def f(output, *, answer, tol=0.5, **more):
        return float(abs(output - answer) <= tol)

    assert f.__reward_required__ == ("answer",) and f.__reward_defaults__ is None
    assert f.__name__ == "f" and f.per_sample(1.0, answer=1.2) == 1.0
    assert f([1.0, 3.0], [{"answer": 1.2}, {"answer": 1.0}], None) == [1.0, 0.0]
    with pytest.raises(TypeError, match="must take"):
        per_sample(lambda output, answer: 1.0)


def test_weighted_sum_components_and_subsets(reg):
    entries = [
        Entry("p0", (spec("length", 0.5), spec("const", 2.0, value=3.0))),
        Entry("p1", (spec("const", -1.0, value=4.0),)),
    ]
    rc = RewardComputer(registry=reg, names=["const", "length"])
    res = rc(["ab", "abcd", "x", "yz"], ctx_of(entries, 2))
    assert res.names == ["const", "length"]
    close(res.total, [0.5 * 2 + 2 * 3, 0.5 * 4 + 2 * 3, -4.0, -4.0])
    close(res.components, [[3.0, 2.0], [3.0, 4.0], [4.0, nan], [4.0, nan]])
    close(res.weights, [[2.0, 0.5], [2.0, 0.5], [-1.0, 0.0], [-1.0, 0.0]])
    assert res.used.tolist() == [[True, True], [True, True], [True, False], [True, False]]
    assert res.total.dtype == torch.float32 and res.failures == {"const": 0, "length": 0}
    # const is called once, with all four samples in group order
    assert reg.calls == [("const", ["ab", "abcd", "x", "yz"], [0, 0, 1, 1])]


def test_reward_sees_only_its_samples_with_their_group_ids(reg):
    entries = [Entry("p0", (spec("length"),)), Entry("p1", (spec("const", value=1.0),))]
    rc = RewardComputer(registry=reg)
    res = rc(["a", "bb", "c", "d", "e", "f"], ctx_of(entries * 1 + entries[1:], 2))
    assert reg.calls == [("const", ["c", "d", "e", "f"], [1, 1, 2, 2])]
    assert rc.names == ["length", "const"]  # built on first use, in that order
    close(res.total, [1.0, 2.0, 1.0, 1.0, 1.0, 1.0])


def test_group_level_reward_reads_group_ids(reg):
    entries = [Entry("p", (spec("unique_in_group"),))] * 3
    res = RewardComputer(registry=reg)(list("aabaccc" + "dx"), ctx_of(entries, 3))
    # groups: [a a b] [a c c] [c d x]: "c" in group 2 is unique there although group 1 has two
    close(res.total, [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0])


def test_raising_reward_fails_its_samples_and_logs_once(reg, caplog):
    entries = [Entry("p0", (spec("boom"), spec("length"))), Entry("p1", (spec("length"),))]
    rc = RewardComputer(registry=reg)
    with caplog.at_level(logging.WARNING, logger="grpo_ar.rewards"):
        for _ in range(3):
            res = rc(["ab", "c", "def", "g"], ctx_of(entries, 2))
    close(res.total, [nan, nan, 3.0, 1.0])
    close(res.components[:, 1], [2.0, 1.0, 3.0, 1.0])  # the other reward still scored them
    assert res.failures == {"boom": 2, "length": 0} and rc.failure_totals["boom"] == 6
    logs = [r for r in caplog.records if "boom" in r.getMessage()]
    assert len(logs) == 1 and logs[0].levelno == logging.ERROR
    assert "RuntimeError: judge server down" in logs[0].getMessage()
    assert logs[0].name == "grpo_ar.rewards"


def test_wrong_length_and_bad_values_are_failures(reg, caplog):
    entries = [Entry("p0", (spec("short"),)), Entry("p1", (spec("spotty"),))]
    rc = RewardComputer(registry=reg)
    with caplog.at_level(logging.WARNING, logger="grpo_ar.rewards"):
        res = rc(["a"] * 12, ctx_of(entries, 6))
        rc(["a"] * 12, ctx_of(entries, 6))
    # spotty: 1.0, None, NaN, inf, "7" (a string is not a score), True
    close(res.total, [nan] * 6 + [1.0, nan, nan, nan, nan, 1.0])
    assert res.failures == {"short": 6, "spotty": 4}
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("'short' returned 5 values for 6 outputs" in m for m in msgs) == 1
    assert sum("'spotty' gave 4 of 6 samples no finite score" in m for m in msgs) == 1


def test_non_sequence_tensor_and_numpy_returns(reg):
    reg.register("scalar")(lambda outputs, args, ctx: 1.0)
    reg.register("tensor")(
        lambda outputs, args, ctx: torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    )
    reg.register("numpy")(lambda outputs, args, ctx: np.array([0.5, np.nan]))
    entries = [Entry(n, (spec(n),)) for n in ("scalar", "tensor", "numpy")]
    res = RewardComputer(registry=reg)(["a"] * 6, ctx_of(entries, 2))
    close(res.total, [nan, nan, 1.0, 2.0, 0.5, nan])
    assert res.failures == {"scalar": 2, "tensor": 0, "numpy": 1}


def test_per_sample_exception_fails_only_that_sample(reg, caplog):
    @reg.register("inverse")
    @per_sample
    def inverse(output, *, x):
        return 1.0 / x

    entries = [Entry("a", (spec("inverse", x=2.0),)), Entry("b", (spec("inverse", x=0.0),))]
    rc = RewardComputer(registry=reg)
    with caplog.at_level(logging.WARNING, logger="grpo_ar.rewards"):
        res = rc(["o"] * 4, ctx_of(entries, 2))
    close(res.total, [0.5, 0.5, nan, nan])
    assert res.failures == {"inverse": 2}
    assert sum("ZeroDivisionError" in r.getMessage() for r in caplog.records) == 1


def test_weight_zero_reward_only_monitors(reg):
    entries = [Entry("p", (spec("length"), spec("boom", 0.0)))]
    res = RewardComputer(registry=reg)(["ab", "c"], ctx_of(entries, 2))
    close(res.total, [2.0, 1.0])
    assert res.failures["boom"] == 2 and res.used[:, 0].all()


def test_repeated_reward_mean_component_exact_total(reg):
    entries = [Entry("p", (spec("const", 1.0, value=1.0), spec("const", 3.0, value=2.0)))]
    res = RewardComputer(registry=reg)(["a"], ctx_of(entries, 1))
    close(res.total, [7.0])
    close(res.components, [[1.5]])
    close(res.weights, [[4.0]])


def test_entry_without_rewards_and_mismatched_inputs(reg):
    rc = RewardComputer(registry=reg)
    close(rc(["a"], ctx_of([Entry("p", ())], 1)).total, [nan])
    empty = rc([], RewardContext([], [], 2, 0))
    assert empty.total.shape == (0,) and empty.components.shape == (0, len(rc.names))
    with pytest.raises(ValueError, match="2 outputs, 1 entries"):
        rc(["a", "b"], ctx_of([Entry("p", (spec("length"),))], 1))


def test_class_reward_setup_and_on_iteration_end(reg):
    rc = RewardComputer({"counter": {"start": 5}}, registry=reg)
    entries = [Entry("p", (spec("counter"),))]
    close(rc(["a", "b"], ctx_of(entries, 2)).total, [5.0, 5.0])
    rc.on_iteration_end(0)
    rc.on_iteration_end(1)
    close(rc(["a", "b"], ctx_of(entries, 2, step=2)).total, [7.0, 7.0])
    assert rc.fns["counter"].steps == [0, 1]
    with pytest.raises(RewardSpecError, match="reward setup of 'counter'.*unexpected keyword"):
        RewardComputer({"counter": {"stat": 5}}, registry=reg)


def test_setup_gives_function_rewards_default_args(reg):
    rc = RewardComputer({"length": {"scale": 10.0}}, registry=reg)
    entries = [Entry("a", (spec("length"),)), Entry("b", (spec("length", scale=1.0),))]
    close(rc(["ab", "abc"], ctx_of(entries, 1)).total, [20.0, 3.0])
    with pytest.raises(RewardSpecError, match="reward setup of 'length'.*takes no argument 'scal'"):
        RewardComputer({"length": {"scal": 10.0}}, registry=reg)


def test_validation_errors_say_what_to_change(reg):
    where = lambda i: f"data.jsonl:{i + 1}"  # noqa: E731
    with pytest.raises(UnknownRewardError) as err:
        validate_specs([Entry("p", (spec("lenght"),))], where, registry=reg)
    assert str(err.value) == (
        "data.jsonl:1: unknown reward 'lenght'; valid names: "
        "boom, const, counter, length, short, spotty, unique_in_group"
    )
    assert isinstance(err.value, DataError) and isinstance(err.value, ValueError)
    ok, missing = Entry("p", (spec("const", value=1),)), Entry("q", (spec("length"), spec("const")))
    with pytest.raises(RewardSpecError, match=r"^entry 1: reward 'const' needs argument 'value'"):
        validate_specs([ok, missing], registry=reg)
    validate_specs([missing], setup={"const": {"value": 0}}, registry=reg)  # setup fills it
    with pytest.raises(
        RewardSpecError, match=r"takes no argument 'sclae'; valid arguments: scale$"
    ):
        validate_specs([Entry("p", (spec("length", sclae=2),))], registry=reg)
    with pytest.raises(RewardSpecError, match=r"entry 0: no reward"):
        validate_specs([Entry("p", ())], registry=reg)
    with pytest.raises(RewardSpecError, match=r"weight nan; use a finite number"):
        validate_specs([Entry("p", (spec("length", nan),))], registry=reg)
    with pytest.raises(RewardSpecError, match=r"^entry 0: .*\(and 2 more entries with reward"):
        validate_specs([missing, missing, missing, ok], registry=reg)


def test_build_rewards_validates_with_instances(reg):
    class Picky:
        def __init__(self, need):
            self.need = need

        def __call__(self, outputs, args, ctx):
            return [1.0] * len(outputs)

        def check_args(self, args):
            if self.need not in args:
                raise ValueError(f"needs {self.need!r} in the entry's args")

    reg.register("picky")(Picky)
    good, bad = Entry("p", (spec("picky", ref=1),)), Entry("q", (spec("picky"),))
    rc = build_rewards({"picky": {"need": "ref"}}, [good], registry=reg)
    assert rc.names == ["picky"]
    with pytest.raises(RewardSpecError, match=r"entry 1: reward 'picky': needs 'ref'"):
        build_rewards({"picky": {"need": "ref"}}, [good, bad], registry=reg)


def test_metrics_hand_computed(reg):
    entries = [Entry("p0", (spec("length"), spec("boom", 0.0))), Entry("p1", (spec("boom"),))]
    res = RewardComputer(registry=reg)(["a", "abc", "x", "y"], ctx_of(entries, 2))
    m = metrics(res)
    assert m["reward/mean"] == pytest.approx(2.0, abs=1e-9)  # totals 1, 3, nan, nan
    assert m["reward/std"] == pytest.approx(1.0, abs=1e-9)
    assert m["reward/failed_frac"] == 0.5
    assert m["reward/length/mean"] == 2.0 and m["reward/length/failed_frac"] == 0.0
    assert m["reward/boom/failures"] == 4.0 and m["reward/boom/failed_frac"] == 1.0
    assert math.isnan(m["reward/boom/mean"])
    assert (
        set(m)
        == set(reward_metrics(res))
        == {f"reward/{k}" for k in ("mean", "std", "failed_frac")}
        | {
            f"reward/{n}/{k}"
            for n in ("boom", "length")
            for k in ("mean", "std", "failures", "failed_frac")
        }
    )


def test_lengths_follow_their_samples(reg):
    @reg.register("tokens")
    def tokens(outputs, args, ctx):
        return [float(n) for n in ctx.lengths]

    entries = [Entry("a", (spec("length"),)), Entry("b", (spec("tokens"),))]
    res = RewardComputer(registry=reg)(["a"] * 4, ctx_of(entries, 2, lengths=[1, 2, 30, 40]))
    close(res.total, [1.0, 1.0, 30.0, 40.0])


def test_builtin_rewards_registered_and_import_light():
    assert {"exact_answer", "numeric_answer", "regex_format", "length_penalty"} <= set(REWARDS)
    assert {"contains", "llm_judge"} <= set(REWARDS)
    assert REWARDS["exact_answer"].required == ("answer",)
    code = (
        "import sys, grpo_ar.rewards; "
        "print([m for m in ('transformers', 'diffusers', 'PIL') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
