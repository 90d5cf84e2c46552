import pytest
import torch

from grpo_ar.rewards import (
    RewardContext,
    RewardSpecError,
    build_rewards,
    extract_answer,
    extract_number,
    find_numbers,
    overlong_penalty,
    parse_answer_number,
    validate_specs,
)
from grpo_ar.rewards.text import compile_pattern, exact_answer, numeric_answer
from grpo_ar.types import Entry, RewardSpec


def score(name, outputs, group_size=1, lengths=None, setup=None, **args):
    """Score outputs with one built-in reward through the computer; returns the totals."""
    entries = [Entry("p", (RewardSpec(name, 1.0, args),))] * len(outputs)
    rc = build_rewards(setup, entries[:1])
    ctx = RewardContext(entries, list(range(len(outputs))), group_size, 0, lengths)
    return rc(outputs, ctx).total.tolist()


NUMBERS = [
    ("42", 42.0),
    ("The answer is 7.", 7.0),
    ("-5", -5.0),
    ("\u22125", -5.0),  # unicode minus
    ("(\u22123)", -3.0),
    ("+3", 3.0),
    ("x = -2", -2.0),
    ("1,234", 1234.0),
    ("Total: 2,500 apples.", 2500.0),
    ("1,234,567.89", 1234567.89),
    ("1,2345", 2345.0),  # not a thousands separator
    ("1,2,3", 3.0),  # a list
    ("$12.50", 12.5),
    ("50%", 50.0),
    ("3/4", 0.75),
    ("7 / 2", 3.5),
    ("\\frac{3}{4}", 0.75),
    ("-\\dfrac{1}{2}", -0.5),
    (".5", 0.5),
    ("-.5", -0.5),
    ("1e-3", 0.001),
    ("6.02E23", 6.02e23),
    ("pages 3-5", 5.0),  # a range, not minus five
    ("<answer>12</answer> and later 99", 12.0),
    ("so \\boxed{\\frac{1}{8}}.", 0.125),
    ("<answer>x = 1,000</answer>", 1000.0),
    ("no number here", None),
    ("1/0", None),
]


@pytest.mark.parametrize(("text", "expected"), NUMBERS)
def test_extract_number_table(text, expected):
    got = extract_number(text)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, rel=1e-12, abs=0)


def test_extract_number_modes():
    text = "<answer>12</answer> but really 99"
    assert extract_number(text, "tagged") == 12.0
    assert extract_number(text, "last") == 99.0
    assert extract_number("just 99", "tagged") is None
    assert extract_number("just 99", "tagged_or_last") == 99.0
    assert find_numbers("a 1, b \u22122.5, c 3/4") == [1.0, -2.5, 0.75]
    with pytest.raises(ValueError, match="use one of tagged_or_last, last, tagged"):
        extract_number("1", "first")


@pytest.mark.parametrize(
    ("output", "answer", "expected"),
    [
        ("1,234", 1234, 1.0),
        ("1234", "1,234", 1.0),
        ("\u22125", -5, 1.0),
        ("3/4", 0.75, 1.0),
        ("0.75", "3/4", 1.0),
        ("The answer is 7.", "7", 1.0),
        ("$12.50", 12.5, 1.0),
        ("\\boxed{-3}", "-3", 1.0),
        ("12.5001", 12.5, 0.0),
        ("I think 8", 7, 0.0),
        ("no idea", 3, 0.0),  # the model failed, the reward did not
    ],
)
def test_numeric_answer_table(output, answer, expected):
    assert numeric_answer.per_sample(output, answer=answer) == expected


def test_numeric_answer_options_and_batch():
    assert numeric_answer.per_sample("12.5001", answer=12.5, tolerance=1e-3) == 1.0
    assert numeric_answer.per_sample("it is 4", answer=4, mode="tagged") == 0.0
    assert score("numeric_answer", ["<answer>4</answer> 5", "4", "5"], answer="4") == [
        1.0,
        1.0,
        0.0,
    ]
    assert parse_answer_number(3) == 3.0 and parse_answer_number("\u22121,000") == -1000.0
    with pytest.raises(ValueError, match="must be a number"):
        parse_answer_number(True)
    with pytest.raises(ValueError, match="exactly one number"):
        parse_answer_number("1 or 2")


def test_numeric_answer_validation_and_failure():
    bad = [Entry("p", (RewardSpec("numeric_answer", 1.0, {"answer": "seven"}),))]
    with pytest.raises(RewardSpecError, match="entry 0: reward 'numeric_answer': answer 'seven'"):
        validate_specs(bad)
    with pytest.raises(RewardSpecError, match="mode='first'"):
        validate_specs(
            [Entry("p", (RewardSpec("numeric_answer", 1.0, {"answer": 1, "mode": "first"}),))]
        )
    # unvalidated, the bad answer fails its samples instead of crashing
    assert numeric_answer(["7", "7"], [{"answer": "seven"}, {"answer": 7}], None) == [None, 1.0]


@pytest.mark.parametrize(
    ("output", "answer", "options", "expected"),
    [
        ("<answer> Paris </answer>", "paris", {}, 1.0),
        ("<answer> Paris </answer>", "paris", {"case_sensitive": True}, 0.0),
        ("<answer>Rome</answer> ... <answer>Paris</answer>", "Paris", {}, 1.0),
        ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", {}, 1.0),
        ("  Paris\n", "Paris", {}, 1.0),
        ("  Paris\n", "Paris", {"strip": False}, 0.0),
        ("The capital is Paris", "Paris", {}, 0.0),
        ("<answer>42</answer>", 42, {}, 1.0),
        ("\\boxed{unclosed", "unclosed", {}, 0.0),
    ],
)
def test_exact_answer_table(output, answer, options, expected):
    assert exact_answer.per_sample(output, answer=answer, **options) == expected


def test_extract_answer_and_non_text_output():
    assert extract_answer(" <answer> 3 </answer> ") == "3"
    assert extract_answer(" plain ") == "plain"
    assert exact_answer([b"bytes"], [{"answer": "x"}], None) == [None]


def test_regex_format():
    think = r"<think>.*</think>\s*<answer>.*</answer>"
    good, bad = "<think>a\nb</think>\n<answer>1</answer>", "<answer>1</answer>"
    assert score("regex_format", [good, bad], pattern=think, flags="s") == [1.0, 0.0]
    assert score("regex_format", [good], pattern=think) == [0.0]  # "." stops at the newline
    assert score("regex_format", ["x <answer>1</answer>"], pattern="<answer>") == [1.0]
    assert score(
        "regex_format", ["x <answer>1</answer>"], pattern="<answer>.*", full_match=True
    ) == [0.0]
    assert score("regex_format", ["ABC"], pattern="abc", flags="i") == [1.0]
    before = compile_pattern.cache_info().hits
    score("regex_format", [good] * 4, pattern=think, flags="s")
    assert compile_pattern.cache_info().hits >= before + 4


def test_regex_format_bad_pattern_caught_at_validation():
    bad = [Entry("p", (RewardSpec("regex_format", 1.0, {"pattern": "(unclosed"}),))]
    with pytest.raises(
        RewardSpecError,
        match=r"entry 0: reward 'regex_format': pattern '\(unclosed' is not a valid regex",
    ):
        validate_specs(bad)
    flags = [Entry("p", (RewardSpec("regex_format", 1.0, {"pattern": "a", "flags": "sq"}),))]
    with pytest.raises(RewardSpecError, match=r"unknown letter\(s\) \['q'\]; use i, m, s, x"):
        validate_specs(flags)


def test_contains():
    assert score("contains", ["Hello world", "hello", "x"], text="Hello") == [1.0, 0.0, 0.0]
    assert score("contains", ["HELLO"], text="hello", case_sensitive=False) == [1.0]


# DAPO eq. 13 with L_max = 20, L_cache = 5: 0 up to 15, then (15 - L) / 5, -1 past 20
DAPO = [(0, 0.0), (15, 0.0), (16, -0.2), (18, -0.6), (20, -1.0), (21, -1.0), (100, -1.0)]


@pytest.mark.parametrize(("length", "expected"), DAPO)
def test_overlong_penalty_table(length, expected):
    assert overlong_penalty(length, 20, 5) == pytest.approx(expected, abs=1e-12)


def test_length_penalty_units():
    outputs = ["x" * n for n, _ in DAPO]
    want = [e for _, e in DAPO]
    setup = {"length_penalty": {"max_len": 20, "cache_len": 5}}
    torch.testing.assert_close(
        torch.tensor(score("length_penalty", outputs, setup=setup)),
        torch.tensor(want),
        atol=1e-6,
        rtol=0,
    )
    # token counts from the trainer replace the character count
    assert score("length_penalty", ["x", "x"], lengths=[16, 30], setup=setup) == pytest.approx(
        [-0.2, -1.0], abs=1e-6
    )
    # a per-sample length arg wins over both
    assert score(
        "length_penalty", ["x"], lengths=[30], length=18, max_len=20, cache_len=5
    ) == pytest.approx([-0.6], abs=1e-6)


def test_length_penalty_validation():
    def check(**args):
        validate_specs([Entry("p", (RewardSpec("length_penalty", 1.0, args),))])

    with pytest.raises(RewardSpecError, match="needs argument 'max_len'"):
        check(cache_len=4)
    with pytest.raises(RewardSpecError, match="need 0 < cache_len <= max_len"):
        check(max_len=10, cache_len=0)
    with pytest.raises(RewardSpecError, match="need 0 < cache_len <= max_len"):
        check(max_len=10, cache_len=11)
    check(max_len=10, cache_len=10)


def test_mixed_rewards_end_to_end():
    fmt = RewardSpec("regex_format", 0.5, {"pattern": r"<answer>.*</answer>"})
    entries = [
        Entry("2+2?", (RewardSpec("numeric_answer", 1.0, {"answer": 4}), fmt)),
        Entry("capital?", (RewardSpec("exact_answer", 1.0, {"answer": "Paris"}),)),
    ]
    rc = build_rewards({}, entries)
    ctx = RewardContext([entries[0]] * 2 + [entries[1]] * 2, [0, 0, 1, 1], 2, 0)
    res = rc(["<answer>4</answer>", "4", "<answer>paris</answer>", "Lyon"], ctx)
    assert res.names == ["exact_answer", "numeric_answer", "regex_format"]
    assert res.total.tolist() == [1.5, 1.0, 1.0, 0.0]
