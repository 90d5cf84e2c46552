"""The Janus example's evaluation is independent of its training (issues 19 and 23): held-out
prompts are never drawn for training, evaluation seeds are never a random stream training draws
from, another evaluation seed changes the sampled images but not the protocol, and the second
reward of the ensemble (`prompt_fidelity`) reads the reward classifier, never the held-out judge.
Tiny pre-training, real Trainer, real sampler."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from example_modules import assert_clash_refused, tiny_argv, train_recording_seeds, training_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

TINY = [
    "data.n_train=300", "vq.steps=5", "cls.steps=5", "scorer.steps=5", "scorer.hidden=32",
    "janus.steps=5", "janus.hidden=32", "janus.layers=1", "rcls.steps=5", "rcls.n_train=64",
    "rcls.n_test=32", "rcls.batch_size=16",
]  # fmt: skip


def _argv(tmp: Path, run: str, *extra: str) -> list[str]:
    return tiny_argv(tmp, run, TINY, *extra)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """(run.py as a module, a folder holding the tiny pre-training cache, pretrain's output)."""
    from janus_t2i import run

    tmp = tmp_path_factory.mktemp("janus_protocol")
    args = run.parse_args(_argv(tmp, "unused"))
    pre = run.pretrain(tmp / "base", verbose=False, **run.parse_overrides(args.pretrain_set))
    return run, tmp, pre


@pytest.mark.slow
def test_training_never_draws_heldout_prompts_or_evaluation_seeds(example):
    run, tmp, _ = example
    from grpo_ar.cli import build_model_and_adapter

    # 10 steps of 2 prompts: one whole epoch of the 20 training prompts, every sample logged
    args = run.parse_args(_argv(tmp, "train", "--set", "trainer.steps=10"))
    cfg, specs = run.setup(args, tmp / "base")
    start, adapter = build_model_and_adapter(cfg)
    train, held = run.prompt_split()
    trainer = run.make_trainer(cfg, 0, start, adapter, run.entries(train, specs))
    train_recording_seeds(trainer, train, held, steps=10, samples=40)
    assert_clash_refused(run.main, _argv, tmp)


@pytest.mark.slow
def test_fidelity_reward_is_wired_and_is_not_the_judge(example):
    run, tmp, pre = example
    from grpo_ar.cli import build_model_and_adapter

    args = run.parse_args(_argv(tmp, "wired", "--fidelity-weight", "3"))
    cfg, specs = run.setup(args, tmp / "base")
    assert [(s["name"], s.get("weight", 1.0)) for s in specs] == [
        ("pickscore", 1.0), ("prompt_fidelity", 3.0)
    ]  # fmt: skip
    start, adapter = build_model_and_adapter(cfg)
    train, _ = run.prompt_split()
    trainer = run.make_trainer(cfg, 0, start, adapter, run.entries(train, specs))
    history = trainer.train()
    # the ensemble: every step's mean reward is pickscore + 3 · prompt_fidelity, both reported
    for h in history:
        want = h["reward/pickscore/mean"] + 3 * h["reward/prompt_fidelity/mean"]
        assert h["reward/mean"] == pytest.approx(want, rel=1e-5)
        assert 0 < h["reward/prompt_fidelity/mean"] < 1
    # the reward reads the reward classifier's weights, which are not the judge's
    net = trainer.rewards.fns["prompt_fidelity"].net
    mine, rcls, judge = (m.state_dict() for m in (net, pre["reward_classifier"],
                                                  pre["classifier"]))  # fmt: skip
    assert all(torch.equal(mine[k], rcls[k]) for k in mine)
    assert not any(torch.equal(mine[k], judge[k]) for k in mine if mine[k].dim() > 1)
    meta = json.loads((tmp / "base" / "meta.json").read_text())["settings"]
    assert meta["rcls"]["seed"] != meta["data"]["seed"]  # other images, other initialisation
    # by hand on some images: p(colour) · p(shape) of the prompt under the reward classifier
    x = torch.rand(4, 3, 16, 16)
    c, s = (t.softmax(-1) for t in pre["reward_classifier"](x))
    args4 = [{"colour": 1, "shape": 2}] * 4
    got = trainer.rewards.fns["prompt_fidelity"](list(x), args4, None)
    torch.testing.assert_close(got, c[:, 1] * s[:, 2])
    jc, js = (t.softmax(-1) for t in pre["classifier"](x))
    # both are near-uniform after 5 tiny steps: a relative difference still tells them apart
    assert not torch.allclose(got, jc[:, 1] * js[:, 2], rtol=1e-3, atol=0)
    # weight 0 drops it: the scorer alone
    args0 = run.parse_args(_argv(tmp, "unused", "--fidelity-weight", "0"))
    assert [s["name"] for s in run.setup(args0, tmp / "base")[1]] == ["pickscore"]


@pytest.mark.slow
def test_other_evaluation_seed_changes_images_not_protocol(example):
    run, tmp, pre = example
    from grpo_ar.cli import build_model_and_adapter

    a = run.main(_argv(tmp, "a", "--seeds", "0", "--eval-seeds", "5", "6"))
    b = run.main(_argv(tmp, "b", "--seeds", "0", "--eval-seed", "6", "7"))
    # the same protocol: prompts, counts, training (metrics of every step), settings
    for key in ("heldout_prompts", "train_prompts", "eval_samples", "seeds", "settings",
                "rewards"):  # fmt: skip
        assert a[key] == b[key]
    assert not set(a["heldout_prompts"]) & set(a["train_prompts"])
    assert len(a["heldout_prompts"]) + len(a["train_prompts"]) == 30
    metrics = [(tmp / r / "seed0" / "metrics.jsonl").read_text().splitlines() for r in "ab"]
    assert training_rows(metrics[0]) == training_rows(metrics[1])
    assert [c["eval_seed"] for c in a["cells"]] == [5, 6] and len(b["cells"]) == 2
    # eval seed 6 measures the same in both runs, whatever else was evaluated
    assert a["cells"][1]["before"] == b["cells"][0]["before"]
    assert a["cells"][1]["after"] == b["cells"][0]["after"]
    # before GRPO the policy is the start model: the KL estimate is exactly 0
    assert all(c["before"]["kl_to_start/per_image"] == 0.0 for c in a["cells"])
    saved = json.loads((tmp / "a" / "results.json").read_text())
    assert saved["summary"]["fidelity/both"]["change"]["n"] == 2
    assert set(saved["summary"]) >= set(run.HEADLINE)
    # and other seeds sample other images (grids) and other tokens from the same model
    from PIL import Image

    grid = lambda c: np.asarray(Image.open(c["grid"]))  # noqa: E731
    assert grid(a["cells"][0]).shape == grid(a["cells"][1]).shape
    assert not np.array_equal(grid(a["cells"][0]), grid(a["cells"][1]))
    cfg, _ = run.setup(run.parse_args(_argv(tmp, "unused")), tmp / "base")
    model, adapter = build_model_and_adapter(cfg)
    _, held = run.prompt_split()
    outs = [run.measure(model, adapter, model, held, 2, s, pre["classifier"], pre["scorer"])
            for s in (5, 6, 5)]  # fmt: skip
    (m5, x5, t5), (m6, x6, t6), (_, x5b, t5b) = outs
    assert t5.shape == t6.shape == (len(held) * 2, 64) and x5.shape == x6.shape
    assert torch.equal(t5, t5b) and torch.equal(x5, x5b)  # a seed is a fixed protocol
    assert (t5 != t6).float().mean() > 0.5  # most codes differ
    assert m5.keys() == m6.keys()


def test_tradeoff_row_reads_a_results_file(tmp_path):
    from janus_t2i import tradeoff

    def metric(before: float, after: float, by_eval: dict[str, float]) -> dict:
        return {"before": {"mean": before}, "after": {"mean": after},
                "change": {"mean": after - before}, "change_by_eval_seed": by_eval}  # fmt: skip

    result = {
        "reward": "pickscore", "seeds": [0, 1, 2], "eval_seeds": [5, 6], "eval_samples": 32,
        "rewards": [{"name": "pickscore"}, {"name": "prompt_fidelity", "weight": 0.5}],
        "settings": {"beta": 0.15, "multi_objective": "normalize_then_sum"},
        "relative_gain": {"mean": 0.3}, "relative_gain_by_cell": [0.4, 0.26, 0.31],
        "summary": {
            "score/pickscore": metric(7.0, 9.1, {"5": 2.0, "6": 2.2}),
            "fidelity/both": metric(0.15, 0.17, {"5": 0.03, "6": 0.01}),
            "fidelity/colour": metric(0.4, 0.39, {"5": 0.0, "6": -0.02}),
            "fidelity/shape": metric(0.3, 0.32, {"5": 0.02, "6": 0.02}),
            "kl_to_start/per_image": metric(0.0, 2.66, {"5": 2.6, "6": 2.72}),
        },
    }  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps(result))
    out = tradeoff.main([str(tmp_path / "r.json")]).splitlines()
    assert len(out) == 3
    assert out[2] == (
        "| 0.5 | normalize then sum | 0.15 | 3 × 2 × 32 | 7.00 → 9.10 (+30.0%; +26.0%) | "
        "+0.020 (+0.010) | -0.010 (-0.020) | +0.020 (+0.020) | 2.7 |"
    )
    result["rewards"] = result["rewards"][:1]  # the scorer alone: nothing is combined
    (tmp_path / "r.json").write_text(json.dumps(result))
    assert tradeoff.main([str(tmp_path / "r.json")]).splitlines()[2].startswith("| 0 | — | 0.15 |")
