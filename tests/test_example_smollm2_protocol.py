"""The SmolLM2 reasoning example's run.py (issue 23's protocol, issue 24 item 8), run through its
command line with a tiny random Llama + ChatML char tokenizer (`--set model.path`) on
prepare.py's real reasoning-gym rows: every training seed is measured on every evaluation seed;
held-out rows are never drawn for training; a clashing evaluation seed is refused before
anything is written; greedy does not depend on the evaluation seed; the worker processes of
`--jobs 2` give exactly the runs of one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from example_modules import load_example, two_by_two_grid

pytest.importorskip("reasoning_gym", reason="the example needs `pip install reasoning-gym`")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """(run.py as a module, a folder with a tiny model and 12 + 5 rows of prepare.py)."""
    from test_multiturn_tools import chat_tokenizer

    from grpo_ar.testing import tiny_llama

    tmp = tmp_path_factory.mktemp("smollm2_protocol")
    tok = chat_tokenizer()
    tiny_llama(vocab_size=len(tok), max_positions=1024).save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    prepare = load_example("smollm2_reasoning", "prepare")
    prepare.prepare_data(tmp / "data", train_size=12, eval_size=5, seed=3, verbose=False)
    return load_example("smollm2_reasoning", "run"), tmp


# the config's rewards, with "a digit anywhere" as the format term: a random model scores on it,
# so the figures below depend on what was sampled
REWARDS = json.dumps([
    {"name": "regex_format", "weight": 0.25, "args": {"pattern": "[0-9]"}},
    {"name": "numeric_answer", "weight": 1.0, "args": {"answer": "$answer", "mode": "tagged_or_last"}},
])  # fmt: skip


def _argv(tmp: Path, run: str, *extra: str) -> list[str]:
    sets = [f"model.path={tmp / 'model'}", "model.device=cpu",
            f"data.train={tmp / 'data' / 'train.jsonl'}", f"data.eval={tmp / 'data' / 'eval.jsonl'}",
            "data.eval_size=3", "trainer.eval_every=1", "trainer.steps=2", "trainer.batch_size=2",
            "trainer.warmup_steps=0", "algorithm.group_size=2", "sampling.max_new_tokens=6",
            "trainer.save_every=0", "log.samples_per_step=100", "log.progress=false",
            f"log.run_dir={tmp / run}", f"data.rewards={REWARDS}"]  # fmt: skip
    return [
        "--eval-batch",
        "2",
        "--eval-samples",
        "4",
        *(x for kv in sets for x in ("--set", kv)),
        *extra,
    ]


def _questions(rows: list[dict]) -> set[str]:
    return {r["prompt"][-1]["content"].split("\n")[0] for r in rows}


def test_every_run_on_every_eval_seed_and_held_out_never_trained(example, capsys):
    ex, tmp = example
    saved = two_by_two_grid(ex.main, _argv(tmp, "a"), tmp / "a")
    assert set(saved["summary"]) == {"accuracy", "format"}
    assert saved["summary"]["accuracy"]["change"]["n"] == 4
    # greedy by problem kind: every held-out row once, its outputs' mean the greedy accuracy
    for m in [saved["before"], *(r["after"] for r in saved["runs"])]:
        kinds = m["greedy_by_kind"].values()
        assert sum(k["n"] for k in kinds) == 5
        mean = sum(k["n"] * k["accuracy"] for k in kinds) / 5
        assert mean == pytest.approx(m["greedy"]["accuracy"], abs=1e-6)
    # greedy: one value per training seed, stats over the training seeds (not the cells)
    assert saved["greedy"]["accuracy"]["after"]["n"] == 2
    assert saved["protocol"]["heldout_rows"] == 5 and saved["commit"]
    # every held-out row is measured (not data.eval_size's 3); the curve is the run's own
    # evaluation of data.eval_size rows at steps 0, 1 and 2
    assert saved["protocol"]["eval_draws"] == {"5": [5 + 7919, 5 + 7921, 5 + 7923],
                                               "6": [6 + 7919, 6 + 7921, 6 + 7923]}  # fmt: skip
    for r in saved["runs"]:
        assert [c["step"] for c in r["curve"]] == [0, 1, 2] and r["eval_rows_in_curve"] == 3
        assert r["steps"] == 2 and len(r["train_reward"]) == 2
    # GRPO drew only training rows, every row of both seeds' steps logged
    data = tmp / "data"
    held = _questions([json.loads(x) for x in (data / "eval.jsonl").read_text().splitlines()])
    train = _questions([json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()])
    for seed in (0, 1):
        rows = [json.loads(x) for x in
                (tmp / "a" / f"seed{seed}" / "samples.jsonl").read_text().splitlines()]  # fmt: skip
        assert len(rows) == 2 * 2 * 2  # 2 steps x 2 problems x 2 samples
        assert _questions(rows) <= train and not _questions(rows) & held
    out = capsys.readouterr().out
    assert "worst eval seed" in out and "target +0.25" in out


def test_worker_processes_give_the_runs_of_one_process(example):
    ex, tmp = example
    one = ex.main(_argv(tmp, "one", "--seeds", "0", "1", "--eval-seeds", "5"))
    two = ex.main(_argv(tmp, "two", "--seeds", "0", "1", "--eval-seeds", "5", "--jobs", "2"))
    for a, b in zip(one["runs"], two["runs"], strict=True):
        assert a["seed"] == b["seed"] and a["train_reward"] == b["train_reward"]
        assert a["after"] == b["after"] and a["curve"] == b["curve"]
        assert 0 < a["after"]["sampled"]["5"]["format"] < 1  # the figures are not constant
    assert one["cells"] == two["cells"]
    assert (tmp / "two" / "seed1" / "worker.log").is_file()


def test_other_eval_seed_changes_neither_training_nor_greedy(example):
    ex, tmp = example
    a = ex.main(_argv(tmp, "b", "--seeds", "0", "--eval-seeds", "5", "6"))
    b = ex.main(_argv(tmp, "c", "--seeds", "0", "--eval-seeds", "6", "7"))
    assert a["runs"][0]["train_reward"] == b["runs"][0]["train_reward"]  # the same training
    assert a["before"]["greedy"] == b["before"]["greedy"]
    assert a["runs"][0]["after"]["greedy"] == b["runs"][0]["after"]["greedy"]
    assert a["cells"][1]["before"] == b["cells"][0]["before"]  # eval seed 6 in both
    assert a["cells"][0]["before"] != a["cells"][1]["before"]  # eval seeds 5 and 6 differ
    assert a["cells"][1]["after"] == b["cells"][0]["after"]


def test_eval_seed_that_is_a_training_stream_is_refused(example):
    ex, tmp = example
    from grpo_ar.parallel.ddp import derive_seed

    # evaluation seed e draws from generators e + 7919 + offset: one that is training seed 1's
    # sampling stream at step 1 is refused before the model loads or anything is written
    clash = derive_seed(1, 1, 0)
    with pytest.raises(
        SystemExit, match=rf"\[{clash - 7919}\] are random streams.* seeds \[\[{clash}"
    ):
        ex.main(_argv(tmp, "clash", "--seeds", "1", "--eval-seeds", "777", str(clash - 7919)))
    assert not (tmp / "clash").exists()
    with pytest.raises(SystemExit):  # two runs of one seed would share a folder
        ex.main(_argv(tmp, "twice", "--seeds", "1", "1"))
    assert not (tmp / "twice").exists()


def test_reuse_measures_finished_runs_without_training_them_again(example, capsys):
    ex, tmp = example
    first = ex.main(_argv(tmp, "r", "--seeds", "0", "--eval-seeds", "5"))
    metrics = tmp / "r" / "seed0" / "metrics.jsonl"
    stamp = metrics.stat().st_mtime_ns
    again = ex.main(_argv(tmp, "r", "--seeds", "0", "--eval-seeds", "5", "6", "--reuse"))
    assert metrics.stat().st_mtime_ns == stamp  # not trained again
    (a,), (b,) = first["runs"], again["runs"]
    assert b["measured_from"].endswith("step_000002") and b["train_reward"] == a["train_reward"]
    # the final checkpoint measures as the trained model did, and under the new eval seed too
    assert b["after"]["greedy"] == a["after"]["greedy"]
    assert b["after"]["sampled"]["5"] == a["after"]["sampled"]["5"] and "6" in b["after"]["sampled"]
    # measured with these settings now: a third call takes the run's figures as they are
    capsys.readouterr()
    third = ex.main(_argv(tmp, "r", "--seeds", "0", "--eval-seeds", "5", "6", "--reuse"))
    assert "reused" in capsys.readouterr().out and third["runs"] == again["runs"]
    with pytest.raises(SystemExit, match="trained with another config"):
        ex.main(_argv(tmp, "r", "--seeds", "0", "--eval-seeds", "5", "--reuse",
                      "--set", "trainer.lr=0.5"))  # fmt: skip


def test_problem_kinds(example):
    ex, _ = example
    got = [ex.kind(f"Calculate {q}.") for q in ("12 + 7", "18 + 5", "39 - 14", "31 - 17", "7 - 39")]
    assert got == ["a+b", "a+b carry", "a-b", "a-b borrow", "a-b < 0"]
    assert ex.kind("State the final answer: 3 + 4 =") == "other"


def test_per_output_scores_average_to_the_evaluation(example):
    """evaluate_rewards(per_output=...) gets one row per output, entry-major, whose means are
    the returned figures (sampled, 3 per prompt, batches of 2)."""
    ex, tmp = example
    from grpo_ar.cli import load_data, load_model
    from grpo_ar.config import load_config
    from grpo_ar.rewards import build_rewards
    from grpo_ar.train.evaluation import evaluate_rewards

    sets = _argv(tmp, "unused")[5::2]  # the --set values
    cfg = load_config(ex.CONFIG, sets)
    heldout = load_data(cfg)[1]
    model, adapter = load_model(cfg)
    rows: list[dict[str, float]] = []
    out = evaluate_rewards(model, adapter, build_rewards(cfg.data.reward_setup, heldout), heldout,
                           greedy=False, samples=3, batch_size=2, seed=5, per_output=rows)  # fmt: skip
    assert len(rows) == 15 and set(rows[0]) == {"reward", "regex_format", "numeric_answer"}
    for key in ("reward", "regex_format", "numeric_answer"):
        assert out[f"eval/sampled/{key}"] == pytest.approx(sum(r[key] for r in rows) / 15)
    assert 0 < out["eval/sampled/regex_format"] < 1
