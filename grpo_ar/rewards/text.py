"""Rule-based text rewards: answers (exact, numeric), format regexes, DAPO's overlong penalty."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

from .base import RewardContext, per_sample, register_reward

_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, nested braces included; None without one."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unclosed: the model ran out of tokens mid-answer


def tagged_answer(text: str) -> str | None:
    """The last `<answer>...</answer>` content, else the last `\\boxed{...}` content, else None."""
    tags = _TAG.findall(text)
    return tags[-1] if tags else _boxed(text)


def extract_answer(text: str) -> str:
    """The tagged answer if any (see `tagged_answer`), else the whole output, stripped."""
    found = tagged_answer(text)
    return (text if found is None else found).strip()


# Digits with optional thousands separators ("1,234" but not "1,2345"), decimals (".5"),
# exponent ("6.02e23"). A sign counts only when no word or closing bracket precedes it, so
# "3-5" reads as 3 and 5, not 3 and -5.
_UNSIGNED = r"(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)(?:[eE][+-]?\d+)?"
_SIGN = r"(?:(?<![\w)\]}])[-+\u2212])?"
_NUMBER = re.compile(
    rf"(?P<sign>{_SIGN})(?:"
    rf"\\[dt]?frac\{{\s*(?P<ln>[-\u2212]?{_UNSIGNED})\s*\}}\{{\s*(?P<ld>{_UNSIGNED})\s*\}}"
    rf"|(?P<n>{_UNSIGNED})(?:\s*/\s*(?P<d>{_UNSIGNED}))?)"
)


def _to_float(s: str) -> float:
    return float(s.replace(",", "").replace("\u2212", "-"))


def find_numbers(text: str) -> list[float]:
    """Every number in `text` in order: "−1,234.5" -> -1234.5, "3/4" and "\\frac{3}{4}" -> 0.75.

    Percent and currency signs are ignored ("50%" -> 50, "$12.50" -> 12.5); x/0 is skipped.
    """
    out = []
    for m in _NUMBER.finditer(text):
        num, den = (m["ln"], m["ld"]) if m["ln"] is not None else (m["n"], m["d"])
        value = _to_float(num)
        if den is not None:
            if _to_float(den) == 0:
                continue
            value /= _to_float(den)
        out.append(-value if m["sign"] in ("-", "\u2212") else value)
    return out


def parse_answer_number(answer: Any) -> float:
    """A reference answer (int, float, or a string holding exactly one number) -> float."""
    if isinstance(answer, bool) or not isinstance(answer, (int, float, str)):
        raise ValueError(f"answer must be a number or a numeric string, got {answer!r}")
    if not isinstance(answer, str):
        return float(answer)
    nums = find_numbers(answer)
    if len(nums) != 1:
        raise ValueError(f"answer {answer!r} must hold exactly one number, found {len(nums)}")
    return nums[0]


def extract_number(text: str, mode: str = "tagged_or_last") -> float | None:
    """The model's numeric answer: the last number inside the tag (`tagged`), in the whole text
    (`last`), or the tag's when there is one, else the text's (`tagged_or_last`)."""
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r}; use one of {', '.join(_MODES)}")
    tagged = None if mode == "last" else tagged_answer(text)
    if tagged is None and mode == "tagged":
        return None
    nums = find_numbers(text if tagged is None else tagged)
    return nums[-1] if nums else None


_MODES = ("tagged_or_last", "last", "tagged")


def _check_numeric(args: Mapping[str, Any]) -> None:
    parse_answer_number(args["answer"])
    if args.get("mode", "tagged_or_last") not in _MODES:
        raise ValueError(f"mode={args['mode']!r}; use one of {', '.join(_MODES)}")
    if not float(args.get("tolerance", 0.0)) >= 0:
        raise ValueError(f"tolerance={args['tolerance']!r} must be >= 0")


@register_reward("exact_answer")
@per_sample
def exact_answer(
    output: str, *, answer: Any, case_sensitive: bool = False, strip: bool = True
) -> float:
    """1.0 when the extracted answer (see `extract_answer`) equals `str(answer)`, else 0.0."""
    if not isinstance(output, str):
        raise TypeError(f"exact_answer scores text, got {type(output).__name__}")
    found = tagged_answer(output)
    got, want = (output if found is None else found), str(answer)
    if strip:
        got, want = got.strip(), want.strip()
    if not case_sensitive:
        got, want = got.casefold(), want.casefold()
    return float(got == want)


@register_reward("numeric_answer", check=_check_numeric)
@per_sample
def numeric_answer(
    output: str, *, answer: Any, tolerance: float = 1e-6, mode: str = "tagged_or_last"
) -> float:
    """1.0 when |extracted number - answer| <= tolerance; an output without a number scores 0.0."""
    if not isinstance(output, str):
        raise TypeError(f"numeric_answer scores text, got {type(output).__name__}")
    got = extract_number(output, mode)
    return float(got is not None and abs(got - parse_answer_number(answer)) <= tolerance)


_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str, flags: str = "") -> re.Pattern[str]:
    """Compile once per (pattern, flags); flags are letters of "imsx" (s = DOTALL)."""
    unknown = set(flags) - set(_FLAGS)
    if unknown:
        raise ValueError(f"flags={flags!r} has unknown letter(s) {sorted(unknown)}; use i, m, s, x")
    try:
        return re.compile(pattern, sum((_FLAGS[f] for f in set(flags)), 0))
    except re.error as e:
        raise ValueError(f"pattern {pattern!r} is not a valid regex: {e}") from None


def _check_regex(args: Mapping[str, Any]) -> None:
    compile_pattern(str(args["pattern"]), str(args.get("flags", "")))


@register_reward("regex_format", check=_check_regex)
@per_sample
def regex_format(output: str, *, pattern: str, full_match: bool = False, flags: str = "") -> float:
    """1.0 when `pattern` matches the output (anywhere, or the whole of it with `full_match`)."""
    rx = compile_pattern(pattern, flags)
    return float((rx.fullmatch if full_match else rx.search)(output) is not None)


@register_reward("contains")
@per_sample
def contains(output: str, *, text: str, case_sensitive: bool = True) -> float:
    """1.0 when `text` occurs in the output."""
    if case_sensitive:
        return float(text in output)
    return float(text.casefold() in output.casefold())


def overlong_penalty(length: int, max_len: int, cache_len: int) -> float:
    """DAPO soft overlong punishment, arXiv 2503.14476 eq. 13: 0 up to max_len - cache_len,
    then linear down to -1 at max_len, -1 beyond."""
    if length <= max_len - cache_len:
        return 0.0
    if length <= max_len:
        return (max_len - cache_len - length) / cache_len
    return -1.0


def _check_length(args: Mapping[str, Any]) -> None:
    max_len, cache_len = args["max_len"], args["cache_len"]
    if not 0 < cache_len <= max_len:
        raise ValueError(f"max_len={max_len}, cache_len={cache_len}: need 0 < cache_len <= max_len")


@register_reward(
    "length_penalty", ("max_len", "cache_len"), defaults={"length": None}, check=_check_length
)
def length_penalty(outputs: list[Any], args: list[dict], ctx: RewardContext) -> list[float]:
    """DAPO overlong penalty (see `overlong_penalty`) in [-1, 0].

    Unit of `max_len`/`cache_len`: the unit of the length used, first found of: the per-sample arg
    `length`, `ctx.lengths[i]` (token counts, filled by the trainer), `len(output)` (characters
    of a string). Give both limits in tokens when the trainer supplies token counts.
    """
    out = []
    for i, (o, a) in enumerate(zip(outputs, args)):
        n = a.get("length")
        if n is None:
            n = ctx.lengths[i] if ctx.lengths is not None else len(o)
        out.append(overlong_penalty(int(n), int(a["max_len"]), int(a["cache_len"])))
    return out


__all__ = [
    "compile_pattern",
    "contains",
    "exact_answer",
    "extract_answer",
    "extract_number",
    "find_numbers",
    "length_penalty",
    "numeric_answer",
    "overlong_penalty",
    "parse_answer_number",
    "regex_format",
    "tagged_answer",
]
