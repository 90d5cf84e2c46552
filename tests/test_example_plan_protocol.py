"""The plan-then-image example's evaluation protocol (issue 23, item 1): every training seed is
measured on every evaluation seed; held-out prompts are never drawn for training; evaluation
seeds are never a random stream training draws from; another evaluation seed changes the samples
but not the protocol; results.json holds the cells and their mean ± spread. Tiny pre-training,
real Trainer, real span sampler."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from example_modules import assert_clash_refused, tiny_argv, train_recording_seeds, training_rows

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))  # the example's modules import each other as plan_then_image.*
from plan_then_image import run  # noqa: E402

TINY = [
    "data.n_train=96", "vq.steps=2", "vq.channels=[8, 8]", "cls.steps=2", "cls.batch_size=16",
    "cls.n_test=16", "rcls.steps=2", "rcls.batch_size=16", "rcls.n_train=64", "rcls.n_test=16",
    "prior.steps=2", "prior.batch_size=8", "prior.hidden=32", "prior.layers=1", "prior.n_train=64",
]  # fmt: skip


def _argv(tmp: Path, run: str, *extra: str) -> list[str]:
    return tiny_argv(tmp, run, TINY, *extra, samples_per_step=100)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A folder holding the tiny pre-training cache (and the parsed defaults)."""
    tmp = tmp_path_factory.mktemp("plan_protocol")
    args = run.parse_args(_argv(tmp, "unused"))
    run.pretrain(tmp / "base", verbose=False, **run.parse_overrides(args.pretrain_set))
    return tmp


def test_seed_options_take_both_forms_and_default_to_three_by_three():
    from ar_common.seeds import EVAL_SEEDS, TRAIN_SEEDS

    args = run.parse_args([])
    assert args.seeds == list(TRAIN_SEEDS) == [0, 1, 2] and not args.ablation
    assert args.eval_seeds == list(EVAL_SEEDS) and len(args.eval_seeds) == 3
    assert run.parse_args(["--seeds", "0,1,2"]).seeds == [0, 1, 2]  # the first README's form
    assert run.parse_args(["--seeds", "3", "4,5"]).seeds == [3, 4, 5]
    assert run.parse_args(["--eval-seed", "9"]).eval_seeds == [9]
    assert run.parse_args(["--eval-seeds", "9", "10"]).eval_seeds == [9, 10]
    with pytest.raises(SystemExit):
        run.parse_args(["--seeds", "0,x"])


@pytest.mark.slow
def test_training_never_draws_heldout_prompts_or_evaluation_seeds(base):
    from grpo_ar.cli import build_model_and_adapter
    from grpo_ar.train.trainer import Trainer

    # 3 steps of 3 prompts: one whole epoch of the 9 training prompts, every sample logged
    args = run.parse_args(_argv(base, "train", "--set", "trainer.steps=3", "--set",
                                "trainer.batch_size=3"))  # fmt: skip
    cfg = run.config(args, base / "base")
    model, adapter = build_model_and_adapter(cfg)
    train, held = run.prompt_split()
    trainer = Trainer(cfg, model, adapter, run.entries(train))
    train_recording_seeds(trainer, train, held, steps=3, samples=3 * 3 * 2)
    assert_clash_refused(run.main, _argv, base)


@pytest.mark.slow
def test_every_run_on_every_eval_seed_and_results_json(base):
    a = run.main(_argv(base, "a", "--seeds", "0,1", "--eval-seeds", "5", "6", "--ablation"))
    b = run.main(_argv(base, "b", "--seeds", "0", "--eval-seed", "6", "7"))
    saved = json.loads((base / "a" / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(a["summary"]))  # what main returned
    # 2 training seeds x 2 evaluation seeds per variant, in that order
    for name in ("full", "plan_weight0"):
        cells = saved["cells"][name]
        assert [(c["train_seed"], c["eval_seed"]) for c in cells] == [(0, 5), (0, 6), (1, 5),
                                                                      (1, 6)]  # fmt: skip
        s = saved["summary"][name]
        assert set(s) == set(run.KEYS) and s["reward"]["change"]["n"] == 4
        assert set(s["reward"]["change_by_eval_seed"]) == {"5", "6"}
        # summarise's numbers are the cells': the mean change by hand
        change = [c["after"]["reward"] - c["before"]["reward"] for c in cells]
        assert s["reward"]["change"]["mean"] == pytest.approx(sum(change) / 4, abs=1e-12)
        # "before" of a cell is the pre-trained prior under that cell's evaluation seed
        assert all(c["before"] == saved["before"][str(c["eval_seed"])] for c in cells)
    assert saved["eval_seeds"] == [5, 6] and saved["seeds"] == [0, 1]
    assert set(saved["plans_before"]) == {"5", "6"} and saved["commit"]
    # the same protocol whatever is evaluated: prompts, counts, training (every step's metrics)
    for key in ("heldout_prompts", "train_prompts"):
        assert a[key] == b[key]
    a_rows, b_rows = ((base / r / "full_seed0" / "metrics.jsonl").read_text() for r in "ab")
    assert training_rows(a_rows.splitlines()) == training_rows(b_rows.splitlines())
    # eval seed 6 measures the same in both runs, before and after training seed 0
    assert a["cells"]["full"][1]["before"] == b["cells"]["full"][0]["before"]
    assert a["cells"]["full"][1]["after"] == b["cells"]["full"][0]["after"]
    # while another evaluation seed samples other plans from the same model
    assert a["plans_before"]["5"] != a["plans_before"]["6"] or a["before"]["5"] != a["before"]["6"]


@pytest.mark.slow
def test_an_evaluation_seed_is_a_fixed_sample(base):
    from grpo_ar.cli import build_model_and_adapter

    args = run.parse_args(_argv(base, "unused"))
    pre = run.pretrain(base / "base", verbose=False, **run.parse_overrides(args.pretrain_set))
    model, adapter = build_model_and_adapter(run.config(args, base / "base"))
    _, held = run.prompt_split()
    outs = [run.evaluate(model, adapter, pre, args, held, s) for s in (5, 6, 5)]
    (m5, x5, p5), (m6, x6, _), (m5b, x5b, p5b) = outs
    assert torch.equal(x5, x5b) and p5 == p5b and m5 == m5b  # a seed is a fixed protocol
    assert x5.shape == x6.shape == (len(held) * 2, 3, 16, 16)
    assert not torch.equal(x5, x6)  # another seed, other images
