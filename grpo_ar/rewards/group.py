"""Group-level rewards: a property of a prompt's whole group (its spread, its diversity).

A group reward sees the G outputs of one prompt together and returns one value per output:

    @register_reward("my_spread")
    @group_reward
    def my_spread(outputs: list[str], *, scale: float = 1.0) -> list[float]:
        ...  # len(outputs) values, or one float given to every member

It then sits in an entry's `rewards` beside per-sample rewards and is weighted and summed like
them (`RewardComputer` does not know the difference).

Credit. A value shared by the whole group is a constant inside the group, so GRPO's group-mean
baseline cancels it: the policy learns nothing from it. The built-ins therefore default to
`credit="loo"`, each member's leave-one-out contribution `f(group) - f(group without i)`
(a difference reward, Wolpert & Tumer 2002): the members that make the group more diverse score
higher. `credit="shared"` gives every member `f(group)`, for monitoring (weight 0) or for
estimators whose baseline is not the group mean.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .base import RewardContext, RewardFn, lifted_from, register_reward, reward_keywords
from .text import compile_pattern

logger = logging.getLogger("grpo_ar.rewards")

CREDITS = ("loo", "shared")


def group_reward(fn: Callable[..., Any]) -> RewardFn:
    """Lift `fn(group_outputs, *, arg, opt=default) -> Sequence[float | None] | float` to the batch
    signature. `group_outputs` is the list of one group's outputs (those that use this reward);
    a scalar result is given to every member. Keyword-only parameters without a default are
    required per-entry args, the others optional. Per-entry args are the same for a whole group
    (one entry per prompt): the first member's are passed. A group whose call raises, or returns
    the wrong number of values, scores None (failed) for all its members; the first error is logged.
    """
    rest = reward_keywords(fn, "group_reward", "group_outputs")
    logged: list[Exception] = []

    def call(members: list[Any], args: dict) -> list[float | None]:
        try:
            vals = fn(members, **args)
            if isinstance(vals, Tensor):
                vals = vals.detach().cpu().reshape(-1).tolist()
            vals = [vals] * len(members) if isinstance(vals, (int, float)) else list(vals)
            if len(vals) != len(members):
                raise ValueError(f"returned {len(vals)} values for a group of {len(members)}")
            return vals
        except Exception as e:  # one odd group must not sink the other groups of the batch
            if not logged:
                logged.append(e)
                logger.warning(
                    "group reward %s failed on a group (logged once): %s", fn.__name__, e
                )
            return [None] * len(members)

    def batch(outputs: list[Any], args: list[dict], ctx: RewardContext) -> list[float | None]:
        groups: dict[int, list[int]] = {}
        for i, g in enumerate(ctx.group_ids):
            groups.setdefault(g, []).append(i)
        out: list[float | None] = [None] * len(outputs)
        for idx in groups.values():
            for i, v in zip(idx, call([outputs[i] for i in idx], args[idx[0]])):
                out[i] = v
        return out

    batch.group_fn = fn  # type: ignore[attr-defined]
    return lifted_from(batch, fn, rest)


def with_credit(
    score: Callable[[list[Any]], float], members: list[Any], credit: str
) -> list[float]:
    """Per-member values of the group score `score`: shared, or leave-one-out differences."""
    whole = score(members)
    if credit == "shared":
        return [whole] * len(members)
    if len(members) < 2:
        return [0.0] * len(members)  # nobody to compare with: no contribution to credit
    return [whole - score(members[:i] + members[i + 1 :]) for i in range(len(members))]


def answer_key(output: Any, pattern: str | None) -> Any:
    """The discrete answer of an output: the stripped text, or `pattern`'s first group (or whole
    match); an output without a match is the answer None (one shared 'invalid' category)."""
    text = output if isinstance(output, str) else str(output)
    if pattern is None:
        return text.strip()
    m = compile_pattern(pattern).search(text)
    return None if m is None else (m.group(1) if m.groups() else m.group(0))


def entropy(keys: Sequence[Any], normalize: int | None = None) -> float:
    """Entropy (nats) of the empirical distribution of `keys`; divided by ln(normalize) if given."""
    n = len(keys)
    h = -sum(c / n * math.log(c / n) for c in Counter(keys).values()) if n else 0.0
    return h / math.log(normalize) if normalize and normalize > 1 else h


def _check_group_args(args: Mapping[str, Any]) -> None:
    if args.get("credit", "loo") not in CREDITS:
        raise ValueError(f"credit={args['credit']!r}; use one of {', '.join(CREDITS)}")
    if "n" in args and (not isinstance(args["n"], int) or args["n"] < 1):
        raise ValueError(f"n={args['n']!r}; use an integer >= 1")
    if args.get("pattern") is not None:
        compile_pattern(args["pattern"])  # raises re.error (a ValueError) on a bad pattern


@register_reward("group_entropy", check=_check_group_args)
@group_reward
def group_entropy(
    outputs: list[Any], *, pattern: str | None = None, categories: int | None = None,
    credit: str = "loo",
) -> list[float]:  # fmt: skip
    """Entropy of the group's empirical answer distribution (nats; / ln(categories) when given).

    Answers are `answer_key(output, pattern)`. With `credit="loo"` a member whose answer is rare
    in its group scores > 0 and one whose answer is common scores < 0.
    """
    keys = [answer_key(o, pattern) for o in outputs]
    return with_credit(lambda ks: entropy(ks, categories), keys, credit)


def ngrams(tokens: Sequence[Any], n: int) -> list[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(seqs: Sequence[Sequence[Any]], n: int) -> float:
    """distinct-n (Li et al. 2016): distinct n-grams / all n-grams over the sequences; 0 if none."""
    grams = [g for s in seqs for g in ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def as_tokens(output: Any) -> list:
    """A text output is split into whitespace words; token ids (list / 1-D tensor) stay ids."""
    if isinstance(output, str):
        return output.split()
    if isinstance(output, Tensor):
        return output.reshape(-1).tolist()
    return list(output)


@register_reward("distinct_n", check=_check_group_args)
@group_reward
def distinct_n_reward(outputs: list[Any], *, n: int = 2, credit: str = "loo") -> list[float]:
    """distinct-n of the group's outputs (texts split into words, or token id sequences)."""
    seqs = [as_tokens(o) for o in outputs]
    return with_credit(lambda ss: distinct_n(ss, n), seqs, credit)


def pairwise_distances(outputs: Sequence[Any], metric: str) -> Tensor:
    """(G, G) distances: "edit" (Levenshtein / max length, texts or token lists), "l2", "cosine"
    (1 - cosine similarity) of outputs flattened to vectors (tensors, arrays, number lists)."""
    if metric == "edit":
        seqs = [o if isinstance(o, str) else as_tokens(o) for o in outputs]
        g = len(seqs)
        d = torch.zeros(g, g, dtype=torch.float64)
        for i in range(g):
            for j in range(i + 1, g):
                d[i, j] = d[j, i] = levenshtein(seqs[i], seqs[j]) / max(
                    len(seqs[i]), len(seqs[j]), 1
                )
        return d
    x = torch.stack(
        [torch.as_tensor(o, dtype=torch.float64).reshape(-1) for o in outputs]
    )  # (G, D)
    if metric == "l2":
        return torch.cdist(x, x)
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=-1)
        return (1 - x @ x.T).clamp(min=0)
    raise ValueError(f"metric={metric!r}; use 'edit', 'l2' or 'cosine'")


def levenshtein(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Edit distance (insertions, deletions, substitutions of one element each)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def _check_distance(args: Mapping[str, Any]) -> None:
    if args.get("metric", "edit") not in ("edit", "l2", "cosine"):
        raise ValueError(f"metric={args['metric']!r}; use 'edit', 'l2' or 'cosine'")


@register_reward("pairwise_distance", check=_check_distance)
@group_reward
def pairwise_distance(outputs: list[Any], *, metric: str = "edit") -> list[float]:
    """Each member's mean distance to the other members of its group (already per member: no
    credit option; the group's mean pairwise distance is the mean of these values)."""
    g = len(outputs)
    if g < 2:
        return [0.0] * g
    return (pairwise_distances(outputs, metric).sum(1) / (g - 1)).tolist()
