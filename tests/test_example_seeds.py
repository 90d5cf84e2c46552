"""examples/ar_common/seeds.py, the seed protocol every example's run.py shares: the grid
summary's two sources of spread, its one-line form, and the check that refuses an evaluation
seed (or a generator seed its evaluation draws from) that training draws from. Hand-computed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from ar_common.seeds import (  # noqa: E402
    EVAL_SEEDS,
    add_seed_options,
    check_eval_seeds,
    grid_cells,
    line,
    summarise,
)

# the start model at eval seeds 7 and 8; after GRPO with training seeds 0 and 1
BEFORE = {7: {"m": 0.5}, 8: {"m": 0.7}}
AFTER = {0: {7: {"m": 0.6}, 8: {"m": 0.6}}, 1: {7: {"m": 0.8}, 8: {"m": 0.7}}}


def test_grid_cells_are_training_seed_major():
    cells = grid_cells(BEFORE, AFTER)
    assert [(c["train_seed"], c["eval_seed"]) for c in cells] == [(0, 7), (0, 8), (1, 7), (1, 8)]
    assert cells[3] == {"train_seed": 1, "eval_seed": 8, "before": {"m": 0.7}, "after": {"m": 0.7}}


def test_summary_splits_training_seeds_from_evaluation_seeds():
    s = summarise(grid_cells(BEFORE, AFTER))["m"]  # keys default to every metric of the cells
    # before over the eval seeds: .5, .7 -> mean .6, sd .2/sqrt 2
    assert s["before_over_eval_seeds"]["mean"] == pytest.approx(0.6, abs=1e-12)
    assert s["before_over_eval_seeds"]["std"] == pytest.approx(0.2 / 2**0.5, abs=1e-12)
    assert s["before_over_eval_seeds"]["n"] == 2
    # per training seed, the mean over eval seeds: after .6 / .75, change 0 / .15
    assert s["after_over_train_seeds"]["mean"] == pytest.approx(0.675, abs=1e-12)
    assert s["after_over_train_seeds"]["std"] == pytest.approx(0.15 / 2**0.5, abs=1e-12)
    assert s["change_over_train_seeds"]["mean"] == pytest.approx(0.075, abs=1e-12)
    assert s["change_by_train_seed"] == pytest.approx({"0": 0.0, "1": 0.15}, abs=1e-12)
    # sd over eval seeds of each training seed, averaged: after 0 and .1/sqrt 2; change
    # (+.1, -.1) and (+.3, 0): .2/sqrt 2 and .3/sqrt 2
    assert s["eval_seed_sd"]["after"] == pytest.approx(0.05 / 2**0.5, abs=1e-12)
    assert s["eval_seed_sd"]["change"] == pytest.approx(0.25 / 2**0.5, abs=1e-12)
    # the cell statistics are those the image example already reads
    assert s["change"]["mean"] == pytest.approx(0.075, abs=1e-12) and s["after"]["n"] == 4
    assert line("m", s) == (
        "m: 0.600 ± 0.141 -> 0.675 ± 0.106 (gain +0.075 ± 0.106; eval-seed sd 0.035; cells "
        "0.600..0.800)"
    )


def test_one_cell_has_no_spread():
    s = summarise(grid_cells({5: {"m": 0.25}}, {0: {5: {"m": 0.5}}}), ["m"])["m"]
    assert s["after_over_train_seeds"] == {"mean": 0.5, "std": 0.0, "min": 0.5, "max": 0.5, "n": 1}
    assert s["eval_seed_sd"] == {"after": 0.0, "change": 0.0}


def test_check_refuses_an_evaluation_whose_draws_are_training_streams():
    # training seed 3, 2 steps: streams 3 + 1_000_003·s + r for s in 0..2 (2: the prefetch),
    # sampling rounds r in 0..rounds-1 and the update's r = -1
    check_eval_seeds([12345, 4, 3_000_012], [3], steps=2)
    with pytest.raises(SystemExit, match=r"evaluation seed\(s\) \[2000009\] are random streams"):
        check_eval_seeds([12345, 2_000_009], [3], steps=2)  # the prefetch of step 2
    with pytest.raises(SystemExit, match=r"\[6\] are random streams of training seeds \[3\]"):
        check_eval_seeds([6], [3], steps=2, rounds=4)  # round 3 under dynamic sampling
    check_eval_seeds([7], [3], steps=2, rounds=4)
    # an evaluation at seed 50 that draws from 50 + 999_956: training seed 3's step 1, round 0
    draws = lambda e: [e + 999_956]  # noqa: E731
    with pytest.raises(SystemExit, match=r"\[50\] .*draws from generator seeds \[\[1000006\]\]"):
        check_eval_seeds([50], [3], steps=2, draws=draws)
    check_eval_seeds([1_000_006], [3], steps=2, draws=draws)  # a stream, but never drawn from
    # more ranks: the update's stream of rank 1 (-2) is refused only when there are 2 ranks
    check_eval_seeds([1_000_004], [3], steps=2)
    with pytest.raises(SystemExit):
        check_eval_seeds([1_000_004], [3], steps=2, world_size=2)


def test_options_take_several_seeds_and_the_old_single_eval_seed():
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval-seed", type=int, default=1)  # run_parser's one-seed option
    add_seed_options(ap, evaluation=(4, 5, 6))
    args = ap.parse_args([])
    assert args.seeds == [0, 1, 2] and args.eval_seeds == [4, 5, 6]
    assert ap.parse_args(["--eval-seed", "9"]).eval_seeds == [9]
    assert ap.parse_args(["--eval-seeds", "9", "10", "--seeds", "3"]).seeds == [3]
    assert len(EVAL_SEEDS) >= 3
