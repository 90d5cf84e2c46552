"""The image example's evaluation is independent of its training (issue 23, item 5): held-out
prompts are never drawn for training, evaluation seeds are never a random stream training draws
from, and another evaluation seed changes the sampled images but not the protocol (same
prompts, same counts, same training). Tiny pre-training, real Trainer, real sampler."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from example_modules import (
    assert_clash_refused,
    example_module,
    load_example,
    tiny_argv,
    train_recording_seeds,
    training_rows,
)

TINY = [
    "data.n_train=96", "cls.n_test=32", "vq.steps=2", "vq.codebook=32", "vq.channels=[8, 8]",
    "cls.steps=2", "cls.batch_size=16", "prior.steps=2", "prior.batch_size=8", "prior.hidden=32",
    "prior.layers=1", "rcls.steps=2", "rcls.batch_size=16", "rcls.n_train=64", "rcls.n_test=32",
]  # fmt: skip


def _argv(tmp: Path, run: str, *extra: str) -> list[str]:
    return tiny_argv(tmp, run, TINY, *extra)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """(run.py as a module, a folder holding the tiny pre-training cache)."""
    tmp = tmp_path_factory.mktemp("image_protocol")
    saved = sys.modules.get("pretrain")  # another example's `pretrain` must not be picked up
    sys.modules["pretrain"] = types.ModuleType("pretrain")
    try:
        with example_module("image_aesthetic", "run") as run:
            args = run.parse_args(_argv(tmp, "unused"))
            run.pretrain(tmp / "base", verbose=False, **run.parse_overrides(args.pretrain_set))
            yield run, tmp
    finally:
        if saved is None:
            sys.modules.pop("pretrain", None)
        else:
            sys.modules["pretrain"] = saved


@pytest.mark.slow
def test_training_never_draws_heldout_prompts_or_evaluation_seeds(example):
    run, tmp = example
    from grpo_ar.cli import build_model_and_adapter

    # 10 steps of 2 prompts: one whole epoch of the 20 training prompts, every sample logged
    args = run.parse_args(_argv(tmp, "train", "--set", "trainer.steps=10"))
    cfg, _, _, specs = run.setup(args, tmp / "base")
    start, adapter = build_model_and_adapter(cfg)
    train, held = run.prompt_split()
    trainer = run.make_trainer(cfg, 0, start, adapter, run.entries(train, specs))
    history = train_recording_seeds(trainer, train, held, steps=10, samples=40)
    assert "reward/prompt_fidelity/mean" in history[0]
    assert_clash_refused(run.main, _argv, tmp)


@pytest.mark.slow
def test_other_evaluation_seed_changes_images_not_protocol(example):
    run, tmp = example
    from grpo_ar.cli import build_model_and_adapter

    a = run.main(_argv(tmp, "a", "--seeds", "0", "--eval-seeds", "5", "6"))
    b = run.main(_argv(tmp, "b", "--seeds", "0", "--eval-seed", "6", "7"))
    # the same protocol: prompts, counts, training (metrics of every step), settings
    for key in ("heldout_prompts", "eval_samples", "seeds", "settings", "rewards"):
        assert a[key] == b[key]
    metrics = [(tmp / r / "seed0" / "metrics.jsonl").read_text().splitlines() for r in "ab"]
    assert training_rows(metrics[0]) == training_rows(metrics[1])
    assert [c["eval_seed"] for c in a["cells"]] == [5, 6] and len(b["cells"]) == 2
    # eval seed 6 measures the same in both runs, whatever else was evaluated
    assert a["cells"][1]["before"] == b["cells"][0]["before"]
    assert a["cells"][1]["after"] == b["cells"][0]["after"]
    # and other seeds sample other images (grids) and other tokens from the same model
    from PIL import Image

    grid = lambda c: np.asarray(Image.open(c["grid"]))  # noqa: E731
    assert grid(a["cells"][0]).shape == grid(a["cells"][1]).shape
    assert not np.array_equal(grid(a["cells"][0]), grid(a["cells"][1]))
    args = run.parse_args(_argv(tmp, "unused"))
    cfg, _, scorers, _ = run.setup(args, tmp / "base")
    model, adapter = build_model_and_adapter(cfg)
    pre = run.pretrain(tmp / "base", verbose=False, **run.parse_overrides(args.pretrain_set))
    _, held = run.prompt_split()
    outs = [run.measure(model, adapter, model, held, 2, s, pre["classifier"], scorers)
            for s in (5, 6, 5)]  # fmt: skip
    (m5, x5, t5), (m6, x6, t6), (_, x5b, t5b) = outs
    assert t5.shape == t6.shape == (len(held) * 2, 64) and x5.shape == x6.shape
    assert torch.equal(t5, t5b) and torch.equal(x5, x5b)  # a seed is a fixed protocol
    assert (t5 != t6).float().mean() > 0.5  # most tokens differ
    assert m5.keys() == m6.keys()


def test_seed_summary_by_hand():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        from ar_common.seeds import check_eval_seeds, pm, summarise, training_streams
    finally:
        sys.path.pop(0)
    cells = [  # 2 training seeds x 2 evaluation seeds of one metric
        {"train_seed": 0, "eval_seed": 7, "before": {"m": 0.5}, "after": {"m": 0.6}},
        {"train_seed": 0, "eval_seed": 8, "before": {"m": 0.7}, "after": {"m": 0.6}},
        {"train_seed": 1, "eval_seed": 7, "before": {"m": 0.5}, "after": {"m": 0.8}},
        {"train_seed": 1, "eval_seed": 8, "before": {"m": 0.7}, "after": {"m": 0.7}},
    ]
    s = summarise(cells, ["m"])["m"]
    # changes +.1, -.1, +.3, 0: mean .075, sample std sqrt(((.025)^2+(.175)^2+(.225)^2+(.075)^2)/3)
    assert s["change"]["mean"] == pytest.approx(0.075, abs=1e-12)
    assert s["change"]["std"] == pytest.approx((0.0875 / 3) ** 0.5, abs=1e-12)
    assert (s["change"]["min"], s["change"]["max"]) == pytest.approx((-0.1, 0.3), abs=1e-12)
    assert s["change_by_eval_seed"] == pytest.approx({"7": 0.2, "8": -0.05}, abs=1e-12)
    assert s["before"]["mean"] == pytest.approx(0.6, abs=1e-12) and s["after"]["n"] == 4
    assert pm(s["after"]) == "0.675 ± 0.096 (0.600..0.800)"
    # seed 3, 2 steps, 1 round: {3} and 3 + 1_000_003·s + r for s in 0..2, r in {0, -1}
    assert training_streams(3, 2) == {2, 3, 1_000_005, 1_000_006, 2_000_008, 2_000_009}
    check_eval_seeds([12345], [3], steps=2)
    with pytest.raises(SystemExit, match=r"evaluation seed\(s\) \[1000006\]"):
        check_eval_seeds([12345, 1_000_006], [3], steps=2)


def test_tradeoff_row_reads_a_results_file(tmp_path):
    tradeoff = load_example("image_aesthetic", "tradeoff")

    def metric(before: float, after: float, by_eval: dict[str, float]) -> dict:
        return {"before": {"mean": before}, "after": {"mean": after},
                "change": {"mean": after - before}, "change_by_eval_seed": by_eval}  # fmt: skip

    result = {
        "reward": "aesthetic_proxy", "seeds": [0, 1, 2], "eval_seeds": [5, 6], "eval_samples": 32,
        "rewards": [{"name": "aesthetic_proxy"}, {"name": "prompt_fidelity", "weight": 0.5}],
        "settings": {"beta": 0.15}, "relative_gain": {"mean": 0.2},
        "summary": {
            "score/aesthetic_proxy": metric(0.5, 0.6, {"5": 0.1, "6": 0.1}),
            "fidelity/both": metric(0.6, 0.62, {"5": 0.03, "6": 0.01}),
            "fidelity/shape": metric(0.7, 0.69, {"5": 0.0, "6": -0.02}),
            "kl_to_start/per_image": metric(0.0, 4.26, {"5": 4.2, "6": 4.32}),
        },
    }  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps(result))
    out = tradeoff.main([str(tmp_path / "r.json")]).splitlines()
    assert len(out) == 3
    assert out[2] == (
        "| 0.5 | 0.15 | 3 × 2 × 32 | 0.500 → 0.600 (+20.0%) | +0.020 (+0.010) | "
        "-0.010 (-0.020) | 4.3 |"
    )
