"""Training seeds × evaluation seeds for the examples' run.py (issue 23: a figure from one seed
is one draw, not a result): the command-line options, the check that evaluation never reuses a
random stream of training, and the mean ± spread summary that README figures are pasted from.

A cell is one (training seed, evaluation seed) pair: {"train_seed", "eval_seed", "before",
"after"}, where "before" / "after" are flat {metric: float} dicts measured on held-out prompts
with the evaluation seed, before and after GRPO with the training seed. Examples that keep
`before[eval_seed]` and `after[train_seed][eval_seed]` dicts turn them into cells with
`grid_cells`.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from grpo_ar.parallel.ddp import derive_seed

TRAIN_SEEDS = (0, 1, 2)
EVAL_SEEDS = (12345, 777, 2024)


def add_seed_options(ap: argparse.ArgumentParser, train: Sequence[int] = TRAIN_SEEDS,
                     evaluation: Sequence[int] = EVAL_SEEDS) -> None:  # fmt: skip
    """--seeds (GRPO training seeds) and --eval-seed/--eval-seeds (held-out sampling seeds),
    several each; replaces run_parser's single --eval-seed."""
    # a group made under "resolve" takes over run_parser's one-seed --eval-seed
    ap.conflict_handler = "resolve"
    group = ap.add_argument_group("seeds (every training seed is measured on every eval seed)")
    group.add_argument("--seeds", type=int, nargs="+", default=list(train), metavar="SEED",
                    help="GRPO training seeds (trainer.seed), one run each")  # fmt: skip
    group.add_argument("--eval-seed", "--eval-seeds", dest="eval_seeds", type=int, nargs="+",
                    default=list(evaluation), metavar="SEED",
                    help="sampling seeds of the held-out evaluation, each measured before and "
                    "after every training run")  # fmt: skip


def training_streams(seed: int, steps: int, rounds: int = 1, world_size: int = 1) -> set[int]:
    """Every torch generator seed a Trainer run with `seed` draws from: the run seed itself,
    sampling round r of step s (`derive_seed(seed, s, r)`, the next step's prefetch included)
    and the update's stream of each rank (`derive_seed(seed, s, -1 - rank)`)."""
    streams = [*range(rounds), *(-1 - r for r in range(world_size))]
    return {seed} | {derive_seed(seed, s, r) for s in range(steps + 1) for r in streams}


def check_eval_seeds(eval_seeds: Iterable[int], train_seeds: Iterable[int], steps: int,
                     rounds: int = 1, *, draws: Callable[[int], Iterable[int]] | None = None,
                     world_size: int = 1) -> None:  # fmt: skip
    """SystemExit if an evaluation seed, or a generator seed its evaluation draws from
    (`draws(eval_seed)`, default the seed itself: an evaluation through `evaluate_rewards`
    draws from `eval_generator_seeds`, not from its seed), is one training draws from: the
    held-out samples would repeat the noise of a training step. `rounds`: the most sampling
    rounds a step may take (`algorithm.dynamic_sampling_max_rounds` covers every config)."""
    train = list(train_seeds)
    used = set().union(*(training_streams(s, steps, rounds, world_size) for s in train))
    hits = {e: sorted(set(draws(e) if draws else [e]) & used) for e in eval_seeds}
    clash = sorted(e for e, hit in hits.items() if hit)
    if clash:
        via = "" if all(hits[e] == [e] for e in clash) else (
            f" (their evaluation draws from generator seeds {[hits[e] for e in clash]})"
        )  # fmt: skip
        raise SystemExit(
            f"evaluation seed(s) {clash} are random streams of training seeds {train} "
            f"({steps} steps){via}: choose other --eval-seeds, e.g. {list(EVAL_SEEDS)}"
        )


def stats(values: Sequence[float]) -> dict[str, float]:
    """mean, std (sample, n - 1; 0 for one value), min, max, n."""
    v = list(values)
    std = statistics.stdev(v) if len(v) > 1 else 0.0
    return {"mean": statistics.fmean(v), "std": std, "min": min(v), "max": max(v), "n": len(v)}


def grid_cells(before: Mapping[int, Mapping[str, float]],
               after: Mapping[int, Mapping[int, Mapping[str, float]]]) -> list[dict[str, Any]]:  # fmt: skip
    """`before[e]` (the start model at eval seed e) and `after[t][e]` (after GRPO with training
    seed t) -> cells, training-seed-major."""
    return [
        {"train_seed": t, "eval_seed": e, "before": dict(before[e]), "after": dict(row[e])}
        for t, row in after.items()
        for e in row
    ]


def summarise(cells: Sequence[dict[str, Any]], keys: Sequence[str] | None = None) -> dict[str, Any]:
    """Per metric (`keys`, default every metric of the first cell): stats of before, after and
    change (after - before) over all cells, the mean change per evaluation seed (over training
    seeds) and the worst cell's change; and the two sources of spread apart (`_split`)."""
    keys = list(cells[0]["before"]) if keys is None else keys
    out: dict[str, Any] = {}
    eval_seeds = list(dict.fromkeys(c["eval_seed"] for c in cells))
    for k in keys:
        change = [c["after"][k] - c["before"][k] for c in cells]
        by_eval = {
            str(e): statistics.fmean(
                c["after"][k] - c["before"][k] for c in cells if c["eval_seed"] == e
            )
            for e in eval_seeds
        }
        out[k] = {
            "before": stats([c["before"][k] for c in cells]),
            "after": stats([c["after"][k] for c in cells]),
            "change": stats(change),
            "change_by_eval_seed": by_eval,
            **_split(cells, k),
        }
    return out


def _split(cells: Sequence[dict[str, Any]], k: str) -> dict[str, Any]:
    """Training seeds against evaluation seeds for metric `k`: "before_over_eval_seeds" (the
    start model per eval seed, averaged over training seeds), "after_/change_over_train_seeds"
    (each training seed's mean over its eval seeds), "change_by_train_seed", and
    "eval_seed_sd" (the mean over training seeds of the sd over their eval seeds)."""
    rows: dict[Any, list[dict[str, Any]]] = {}
    for c in cells:
        rows.setdefault(c["train_seed"], []).append(c)
    by_e: dict[Any, list[float]] = {}
    for c in cells:
        by_e.setdefault(c["eval_seed"], []).append(c["before"][k])
    after = [[c["after"][k] for c in r] for r in rows.values()]
    change = [[c["after"][k] - c["before"][k] for c in r] for r in rows.values()]
    return {
        "before_over_eval_seeds": stats([statistics.fmean(v) for v in by_e.values()]),
        "after_over_train_seeds": stats([statistics.fmean(v) for v in after]),
        "change_over_train_seeds": stats([statistics.fmean(v) for v in change]),
        "change_by_train_seed": {str(t): statistics.fmean(v) for t, v in zip(rows, change)},
        "eval_seed_sd": {
            "after": statistics.fmean(stats(v)["std"] for v in after),
            "change": statistics.fmean(stats(v)["std"] for v in change),
        },
    }


def pm(s: dict[str, float], digits: int = 3) -> str:
    """'mean ± std (min..max)'."""
    mean, std, lo, hi = (f"{s[k]:.{digits}f}" for k in ("mean", "std", "min", "max"))
    return f"{mean} ± {std} ({lo}..{hi})"


def line(label: str, s: dict[str, Any], digits: int = 3) -> str:
    """One metric of `summarise` on one line: before (mean ± sd over the eval seeds) -> after
    (mean ± sd over the training seeds, each the mean over its eval seeds), the change likewise,
    the mean sd over eval seeds, and the range of the after cells."""
    b, a, g = s["before_over_eval_seeds"], s["after_over_train_seeds"], s["change_over_train_seeds"]
    f = lambda x: f"{x:.{digits}f}"  # noqa: E731
    return (
        f"{label}: {f(b['mean'])} ± {f(b['std'])} -> {f(a['mean'])} ± {f(a['std'])} (gain "
        f"{g['mean']:+.{digits}f} ± {f(g['std'])}; eval-seed sd {f(s['eval_seed_sd']['after'])}; "
        f"cells {f(s['after']['min'])}..{f(s['after']['max'])})"
    )


def table(summary: dict[str, Any], labels: dict[str, str], digits: int = 3) -> str:
    """A markdown table of `summary` (from `summarise`): one row per metric in `labels`, columns
    before, after, change (each mean ± std (min..max) over the cells), and the worst evaluation
    seed's mean change."""
    lines = [
        "| held-out metric | before | after | change | worst eval seed (mean change) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for k, label in labels.items():
        s = summary[k]
        worst = min(s["change_by_eval_seed"].items(), key=lambda kv: kv[1])
        lines.append(
            f"| {label} | {pm(s['before'], digits)} | {pm(s['after'], digits)} | "
            f"{pm(s['change'], digits)} | {worst[0]}: {worst[1]:+.{digits}f} |"
        )
    return "\n".join(lines)


__all__ = [
    "EVAL_SEEDS",
    "TRAIN_SEEDS",
    "add_seed_options",
    "check_eval_seeds",
    "grid_cells",
    "line",
    "pm",
    "stats",
    "summarise",
    "table",
    "training_streams",
]
