"""The main demo: a tiny Llama starts weak at arithmetic, GRPO raises its held-out accuracy.

1. Pre-train (or reuse the cached) tiny char-level Llama briefly on `a+b=` problems (pretrain.py).
2. Measure held-out accuracy (distinct test-split problems, which training never holds) with
   grpo_ar's own evaluation: greedy (draws nothing, so the same at every evaluation seed) and
   sampled at the training temperature, once per evaluation seed (sampling seeds no training
   run draws from, checked before anything runs).
3. GRPO with the `numeric_answer` reward on training problems only, once per training seed,
   each from the same pre-trained start.
4. Measure again; print before -> after per cell and mean ± spread over the grid (training
   seeds × evaluation seeds); write <log.run_dir>/results.json, each run's files under
   <log.run_dir>/seed<N>/.

`python examples/text_arithmetic/run.py [--seeds 0 1 2] [--eval-seeds 12345 777 2024]
[--eval-n 200] [--eval-samples 4] [--set key=value ...]`
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # ar_common

from ar_common.seeds import add_seed_options, check_eval_seeds, grid_cells, line, summarise  # noqa: E402
from pretrain import TASK, pretrain  # noqa: E402
from task import make_problems  # noqa: E402

from grpo_ar.adapters.text import TextAdapter  # noqa: E402
from grpo_ar.config import load_config  # noqa: E402
from grpo_ar.io.data import load_rows  # noqa: E402
from grpo_ar.train.evaluation import eval_generator_seeds, evaluate_rewards  # noqa: E402
from grpo_ar.train.trainer import Trainer  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "config.toml"
HELDOUT_SEED = 1  # one held-out set for every training seed (the one seed 0 always used)
EVAL_BATCH = 100
LABELS = {"greedy": "held-out accuracy, greedy", "sampled": "held-out accuracy, sampled"}


def rows_to_entries(rows: list[dict[str, str]]) -> list:
    return load_rows(
        rows,
        default_rewards=[{"name": "numeric_answer", "args": {"answer": "$answer", "mode": "last"}}],
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--base", default="runs/arith_base", help="cache folder of the pre-trained model"
    )
    ap.add_argument(
        "--pretrain-steps", type=int, default=None, help="override pretrain.py's default"
    )
    ap.add_argument(
        "--eval-n", type=int, default=200, help="distinct held-out problems (249 exist)"
    )
    ap.add_argument("--eval-samples", type=int, default=4,
                    help="sampled answers per held-out problem at each evaluation seed")  # fmt: skip
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    add_seed_options(ap)
    return ap.parse_args(argv)


def measure(trainer: Trainer, heldout: list, samples: int, eval_seeds: list[int]) -> dict:
    """{eval seed: {"greedy", "sampled"}} held-out accuracy of the trainer's model. Sampled:
    `samples` answers per problem at the config's temperature from the generators of
    `eval_generator_seeds(eval seed, ...)`. Greedy is measured once (with the first eval seed's
    generators, unused): it draws nothing, so every evaluation seed would give the same value."""
    m, ad, rw = trainer.model, trainer.adapter, trainer.rewards
    greedy = evaluate_rewards(m, ad, rw, heldout, greedy=True, batch_size=EVAL_BATCH,
                              seed=eval_seeds[0])  # fmt: skip
    out = {}
    for e in eval_seeds:
        got = evaluate_rewards(m, ad, rw, heldout, greedy=False, samples=samples,
                               batch_size=EVAL_BATCH, seed=e)  # fmt: skip
        out[e] = {"greedy": greedy["eval/greedy/numeric_answer"],
                  "sampled": got["eval/sampled/numeric_answer"]}  # fmt: skip
    return out


def show(label: str, acc: dict[int, dict[str, float]]) -> str:
    first = next(iter(acc.values()))
    sampled = ", ".join(f"{e} {m['sampled']:.3f}" for e, m in acc.items())
    return (
        f"{label}: greedy {first['greedy']:.3f} (every eval seed); sampled, by eval seed: {sampled}"
    )


def grpo_run(sets: list[str], seed: int, start: Any, tok: Any, run_dir: Path) -> Trainer:
    """A Trainer for training seed `seed` on a copy of the start model, files in seed<N>/."""
    cfg = load_config(
        CONFIG, [*sets, f"trainer.seed={seed}", f"log.run_dir={run_dir / f'seed{seed}'}"]
    )
    train = rows_to_entries(make_problems(4000, seed, "train", **TASK))
    return Trainer(cfg, copy.deepcopy(start), TextAdapter(tok, cfg.sampling), train)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0, load0 = time.perf_counter(), os.getloadavg()
    cfg = load_config(CONFIG, args.set)
    heldout = rows_to_entries(make_problems(args.eval_n, HELDOUT_SEED, "test", unique=True, **TASK))
    draws = {e: eval_generator_seeds(e, len(heldout), EVAL_BATCH) for e in args.eval_seeds}
    check_eval_seeds(args.eval_seeds, args.seeds, cfg.trainer.steps,
                     cfg.algorithm.dynamic_sampling_max_rounds, draws=draws.__getitem__)  # fmt: skip
    kw = {} if args.pretrain_steps is None else {"steps": args.pretrain_steps}
    start, tok = pretrain(args.base, **kw)
    t_pre = time.perf_counter() - t0
    run_dir = Path(cfg.log.run_dir)
    before: dict[int, dict[str, float]] = {}
    after: dict[int, dict[int, dict[str, float]]] = {}
    runs = []
    n = f"{len(heldout)} problems, {args.eval_samples} samples each at T = {cfg.sampling.temperature}"
    for t in args.seeds:
        trainer = grpo_run(args.set, t, start, tok, run_dir)
        if not before:  # the start model is the same for every training seed
            before = measure(trainer, heldout, args.eval_samples, args.eval_seeds)
            print(show(f"held-out accuracy before GRPO ({n})", before), flush=True)
        t1 = time.perf_counter()
        history = trainer.train()
        runs.append(_run_stats(t, history, time.perf_counter() - t1))
        after[t] = measure(trainer, heldout, args.eval_samples, args.eval_seeds)
        print(show(f"held-out accuracy after  GRPO, trainer.seed {t}", after[t]), flush=True)
        r = runs[-1]
        print(f"GRPO trainer.seed {t}: {r['steps']} steps in {r['grpo_seconds']:.0f}s, train reward "
              f"{r['train_reward_first']:.3f} -> {r['train_reward_last5']:.3f} (last 5), KL to "
              f"reference {r['kl_last_step']:.4f}, load {r['load_end']:.1f}", flush=True)  # fmt: skip
    cells = grid_cells(before, after)
    result = {
        "protocol": {"heldout_problems": [e.prompt for e in heldout], "heldout_seed": HELDOUT_SEED,
                     "samples_per_problem": args.eval_samples,
                     "temperature": cfg.sampling.temperature, "train_seeds": args.seeds,
                     "eval_seeds": args.eval_seeds, "eval_draws": {str(e): d for e, d in draws.items()},
                     "greedy": "seed-independent: measured once per model", "config": args.set},
        "cells": cells, "summary": summarise(cells, list(LABELS)), "runs": runs,
        "seconds": {"pretrain": t_pre, "total": time.perf_counter() - t0},
        "loadavg_1min": {"start": load0[0], "end": os.getloadavg()[0]},
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(result, indent=2))
    _print_summary(result, run_dir)
    return result


def _run_stats(seed: int, history: list[dict[str, float]], seconds: float) -> dict[str, Any]:
    last = history[-min(5, len(history)) :]
    return {"seed": seed, "steps": len(history), "grpo_seconds": seconds,
            "train_reward_first": history[0]["reward/mean"],
            "train_reward_last5": sum(h["reward/mean"] for h in last) / len(last),
            "kl_last_step": history[-1].get("kl", 0.0), "load_end": os.getloadavg()[0]}  # fmt: skip


def _print_summary(result: dict[str, Any], run_dir: Path) -> None:
    p, s = result["protocol"], result["seconds"]
    print(f"training seeds {p['train_seeds']} x eval seeds {p['eval_seeds']}: before (mean ± sd "
          "over eval seeds) -> after (mean ± sd over training seeds, each the mean over eval seeds)")  # fmt: skip
    for key, label in LABELS.items():
        print(line(label, result["summary"][key]))
    load = result["loadavg_1min"]
    print(f"total {s['total']:.0f}s (pre-training {s['pretrain']:.0f}s); load average "
          f"{load['start']:.1f} -> {load['end']:.1f}; results {run_dir / 'results.json'}")  # fmt: skip


if __name__ == "__main__":
    main()
