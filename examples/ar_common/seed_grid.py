"""The evaluation protocol the examples share: training seeds × evaluation seeds, evaluation
seeds checked against every generator seed a training run draws from, and mean ± spread over
the grid (issue 23: a figure from one seed is one draw, not a result)."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Iterable, Mapping
from typing import Any

from grpo_ar.parallel.ddp import derive_seed

EVAL_SEEDS = (12345, 23456, 34567)
TRAIN_SEEDS = (0, 1, 2)


def add_seed_args(ap: argparse.ArgumentParser, eval_seeds: tuple[int, ...] = EVAL_SEEDS) -> None:
    """--seeds (training seeds: trainer.seed of each GRPO run) and --eval-seeds (the sampling
    seeds of the held-out evaluation, the same for every run)."""
    ap.add_argument("--seeds", type=int, nargs="+", default=list(TRAIN_SEEDS),
                    help="training seeds (trainer.seed), one GRPO run each")  # fmt: skip
    ap.add_argument("--eval-seeds", type=int, nargs="+", default=list(eval_seeds),
                    help="sampling seeds of the held-out evaluation; training never draws "
                    "from them (checked)")  # fmt: skip


def training_draws(seed: int, steps: int, rounds: int = 8, ranks: int = 1) -> set[int]:
    """Every generator seed a Trainer with trainer.seed=`seed` draws from over `steps` steps
    (grpo_ar.parallel.ddp.derive_seed: sampling rounds 0.. and the update's streams -1-rank),
    its own seed (model init, prompt order) included; `rounds` bounds the resampling rounds."""
    out = {seed}
    for step in range(steps + 2):  # +1: the prefetch of the step after the last
        out.update(derive_seed(seed, step, r) for r in range(-ranks, rounds))
    return out


def check_disjoint(eval_draws: Mapping[int, Iterable[int]], train_seeds: Iterable[int],
                   steps: int) -> None:  # fmt: skip
    """Refuse an evaluation seed whose draws (`eval_draws`: eval seed -> the generator seeds
    its evaluation uses) meet a training run's: the held-out samples would repeat the noise
    that training was rewarded on."""
    for t in train_seeds:
        used = training_draws(t, steps)
        for e, draws in eval_draws.items():
            hit = sorted(used & set(draws))
            if hit:
                raise SystemExit(
                    f"--eval-seeds {e}: its evaluation draws from generator seed {hit[0]}, which "
                    f"training seed {t} also uses: pick another evaluation seed, e.g. "
                    f"{EVAL_SEEDS[0]}"
                )


def spread(values: list[float]) -> dict[str, float]:
    """mean, sd (n - 1; 0 for one value), min, max, n."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "min": min(values),
            "max": max(values), "n": len(values)}  # fmt: skip


def grid_summary(before: Mapping[int, Mapping[str, float]],
                 after: Mapping[int, Mapping[int, Mapping[str, float]]]) -> dict[str, dict]:  # fmt: skip
    """`before[e][key]` (the start model, per eval seed) and `after[t][e][key]` (per training
    seed t and eval seed e) -> per key: "before" over the eval seeds; "after" and "gain" (after
    − before at the same eval seed) as the spread over training seeds of each seed's mean over
    the eval seeds, with "eval_sd" (the mean over training seeds of the sd over eval seeds) and
    "cells" (min and max over every (t, e) pair)."""
    first = next(iter(before.values()))
    keys = [k for k, v in first.items() if isinstance(v, float)]
    out: dict[str, dict] = {}
    for k in keys:
        after_k = [[after[t][e][k] for e in after[t]] for t in after]
        gain_k = [[after[t][e][k] - before[e][k] for e in after[t]] for t in after]
        out[k] = {"before": spread([before[e][k] for e in before]),
                  "after": over_grid(after_k), "gain": over_grid(gain_k)}  # fmt: skip
    return out


def over_grid(per_t: list[list[float]]) -> dict[str, Any]:
    """Rows of training seeds, columns of eval seeds -> the spread over training seeds of the
    row means, "eval_sd" (the mean of the rows' sd) and "cells" ([min, max] of all values)."""
    s: dict[str, Any] = spread([statistics.fmean(v) for v in per_t])
    s["eval_sd"] = statistics.fmean(spread(v)["sd"] for v in per_t)
    flat = [x for v in per_t for x in v]
    s["cells"] = [min(flat), max(flat)]
    return s


def pm(s: Mapping[str, float], digits: int = 3) -> str:
    """'0.797 ± 0.052' (mean ± sd)."""
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def summary_line(name: str, row: Mapping[str, Mapping], digits: int = 3) -> str:
    """One line of the grid: before (over eval seeds) -> after (over training seeds), gain,
    eval-seed sd and the range of the cells."""
    a, g = row["after"], row["gain"]
    lo, hi = a["cells"]
    return (
        f"{name}: {pm(row['before'], digits)} -> {pm(a, digits)} (gain {g['mean']:+.{digits}f} "
        f"± {g['sd']:.{digits}f}; eval-seed sd {a['eval_sd']:.{digits}f}; cells "
        f"{lo:.{digits}f}..{hi:.{digits}f})"
    )
