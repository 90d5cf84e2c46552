"""Training seeds × evaluation seeds for the examples' run.py: the command-line options, the check
that evaluation never reuses a random stream of training, and the mean ± spread summary that
README figures are pasted from.

A cell is one (training seed, evaluation seed) pair: {"train_seed", "eval_seed", "before",
"after"}, where "before" / "after" are flat {metric: float} dicts measured on held-out prompts
with the evaluation seed, before and after GRPO with the training seed.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Iterable, Sequence
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
                     rounds: int = 1) -> None:  # fmt: skip
    """SystemExit if an evaluation seed is one training draws from: the held-out samples would
    repeat the noise of a training step."""
    train = list(train_seeds)
    used = set().union(*(training_streams(s, steps, rounds) for s in train))
    clash = sorted(set(eval_seeds) & used)
    if clash:
        raise SystemExit(
            f"evaluation seed(s) {clash} are random streams of training seeds {train} "
            f"({steps} steps): choose other --eval-seeds, e.g. {list(EVAL_SEEDS)}"
        )


def stats(values: Sequence[float]) -> dict[str, float]:
    """mean, std (sample, n - 1; 0 for one value), min, max, n."""
    v = list(values)
    std = statistics.stdev(v) if len(v) > 1 else 0.0
    return {"mean": statistics.fmean(v), "std": std, "min": min(v), "max": max(v), "n": len(v)}


def summarise(cells: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, Any]:
    """Per metric: stats of before, after and change (after - before) over all cells, the mean
    change per evaluation seed (over training seeds), and the worst cell's change."""
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
        }
    return out


def pm(s: dict[str, float], digits: int = 3) -> str:
    """'mean ± std (min..max)'."""
    mean, std, lo, hi = (f"{s[k]:.{digits}f}" for k in ("mean", "std", "min", "max"))
    return f"{mean} ± {std} ({lo}..{hi})"


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
    "pm",
    "stats",
    "summarise",
    "table",
    "training_streams",
]
