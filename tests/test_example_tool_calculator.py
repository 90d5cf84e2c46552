"""Smoke test of examples/tool_calculator: a tiny random Llama with a ChatML char tokenizer runs
the whole experiment (reasoning-gym data, evaluation before/after, 2 GRPO steps over tool
trajectories), and the calculator tool itself answers exactly and refuses non-arithmetic."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest

pytest.importorskip("reasoning_gym", reason="the example needs `pip install reasoning-gym`")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tool_calculator" / "run.py"


def _example():
    spec = importlib.util.spec_from_file_location("tool_calculator_run", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_calculator_tool():
    ex = _example()
    assert ex.calculator("417 * 382") == "159294"
    assert ex.calculator("7 / 2") == "3.5"
    with pytest.raises(ValueError, match="only numbers"):
        ex.calculator("__import__('os')")


def test_tiny_model_runs_the_experiment(tmp_path):
    from test_multiturn_tools import NAMES, chat_tokenizer

    from tiny import tiny_llama

    ex = _example()
    tok = chat_tokenizer(NAMES)  # tools named in the system turn: short char-level prompts
    model = tiny_llama(vocab_size=len(tok))
    evals = ex.make_rows(4, seed=10_000)
    train = ex.make_rows(8, seed=0, exclude={r["question"] for r in evals})
    assert not {r["question"] for r in train} & {r["question"] for r in evals}
    for r in evals + train:
        assert [len(x) for x in re.findall(r"\d+", r["question"])] == [3, 3], r["question"]
    out = ex.experiment(
        model, tok, train, evals, str(tmp_path), steps=2,
        overrides=("trainer.batch_size=2", "algorithm.group_size=2"),
        max_new=8, max_turns=2, max_tokens=24, seeds=(0,), eval_seeds=(5,),
    )  # fmt: skip
    assert set(out["before"]["greedy"]) == {"accuracy", "tool_use_rate", "failed_calls"}
    assert 0 <= out["before"]["sampled"][5]["accuracy"] <= 1
    (run,) = out["runs"]
    assert len(run["steps"]) == 2 and run["train_s"] > 0
    assert all(math.isfinite(s["turns/mean"]) for s in run["steps"])
