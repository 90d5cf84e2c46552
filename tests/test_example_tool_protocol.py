"""The tool-calculator example's evaluation protocol (issue 23, item 1), run through its
command line with a tiny random char-level Llama (`--model-dir`) instead of SmolLM2: every
training seed is measured on every evaluation seed; held-out problems are never drawn for
training; an evaluation seed that is a training stream is refused before anything runs; the
greedy evaluation does not depend on the evaluation seed; results.json holds the cells and their
mean ± spread."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from example_modules import load_example, two_by_two_grid

pytest.importorskip("reasoning_gym", reason="the example needs `pip install reasoning-gym`")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """(run.py as a module, a folder holding a tiny Llama + ChatML char tokenizer)."""
    from test_multiturn_tools import NAMES, chat_tokenizer

    from grpo_ar.testing import tiny_llama

    tmp = tmp_path_factory.mktemp("tool_protocol")
    tok = chat_tokenizer(NAMES)  # tools named in the system turn: short char-level prompts
    tiny_llama(vocab_size=len(tok)).save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    return load_example("tool_calculator", "run"), tmp


def _argv(tmp: Path, run: str, *extra: str) -> list[str]:
    return [
        "--model-dir", str(tmp / "model"), "--run-dir", str(tmp / run), "--steps", "2",
        "--train-size", "6", "--eval-size", "3", "--max-new", "8", "--max-tokens", "24",
        "--set", "trainer.batch_size=2", "--set", "algorithm.group_size=2",
        "--set", "log.samples_per_step=100", *extra,
    ]  # fmt: skip


def _question(prompt: list[dict[str, str]]) -> str:
    return prompt[-1]["content"].split("\n")[0]  # the last user turn: "Calculate a * b."


def test_every_run_on_every_eval_seed_and_held_out_never_trained(example, capsys):
    ex, tmp = example
    saved = two_by_two_grid(ex.main, _argv(tmp, "a"), tmp / "a")
    s = saved["summary"]
    assert set(s) == {"accuracy", "tool_use_rate", "failed_calls"}
    assert s["accuracy"]["change"]["n"] == 4 and set(s["accuracy"]["change_by_eval_seed"]) == {
        "5", "6"}  # fmt: skip
    # greedy: one value per training seed, stats over the training seeds (not the cells)
    assert saved["greedy"]["after"]["accuracy"]["n"] == 2
    assert [r["seed"] for r in saved["runs"]] == [0, 1] and saved["commit"]
    assert saved["settings"]["temperature"] == 1.0 and saved["eval_size"] == 3
    # GRPO drew only training problems: every logged sample of both seeds' steps
    held = {_question([{"content": q}]) for q in saved["heldout_questions"]}
    for seed in (0, 1):
        rows = [json.loads(x) for x in
                (tmp / "a" / f"seed{seed}" / "samples.jsonl").read_text().splitlines()]  # fmt: skip
        assert len(rows) == 2 * 2 * 2  # 2 steps x 2 problems x 2 trajectories
        assert not {_question(r["prompt"]) for r in rows} & held
    out = capsys.readouterr().out
    assert "worst eval seed" in out and "does not depend on the eval seed" in out


def test_other_eval_seed_changes_neither_training_nor_greedy(example):
    ex, tmp = example
    a = ex.main(_argv(tmp, "b", "--seeds", "0", "--eval-seeds", "5", "6"))
    b = ex.main(_argv(tmp, "c", "--seeds", "0", "--eval-seed", "6", "7"))
    assert a["heldout_questions"] == b["heldout_questions"]
    assert a["runs"][0]["steps"] == b["runs"][0]["steps"]  # the same training
    assert a["before"]["greedy"] == b["before"]["greedy"]
    assert a["runs"][0]["greedy"] == b["runs"][0]["greedy"]
    assert a["cells"][1]["before"] == b["cells"][0]["before"]  # eval seed 6 in both
    assert a["cells"][1]["after"] == b["cells"][0]["after"]


def test_eval_seed_that_is_a_training_stream_is_refused(example):
    ex, tmp = example
    from grpo_ar.parallel.ddp import derive_seed

    clash = derive_seed(1, 1, 0)
    with pytest.raises(SystemExit, match=rf"evaluation seed\(s\) \[{clash}\] are random streams"):
        ex.main(_argv(tmp, "clash", "--seeds", "1", "--eval-seeds", "777", str(clash)))
    assert not (tmp / "clash").exists()


def test_sampled_evaluation_is_seeded_and_greedy_is_not_random(example):
    ex, tmp = example
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp / "model")
    adapter = ex.build_adapter(tok, 8, 2, 24)
    evals = ex.entries(ex.make_rows(3, seed=10_000))
    prompts = adapter.encode(evals)

    def ids(seed: int | None):
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        return adapter.sample(model, prompts, 1, generator=gen, greedy=seed is None).completion_ids

    assert torch.equal(ids(5), ids(5)) and not torch.equal(ids(5), ids(6))
    torch.manual_seed(0)
    g0 = ids(None)
    torch.manual_seed(1)  # the global RNG does not reach greedy decoding
    assert torch.equal(g0, ids(None))
    assert ex.evaluate(model, adapter, evals, 5) == ex.evaluate(model, adapter, evals, 5)
