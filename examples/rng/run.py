"""RNG example: a tiny Llama pre-trained on skewed digits learns, with a group-level reward, to
emit uniformly distributed digits, and each prompt's samples stay diverse.

1. Pre-train (or reuse) the model on digits drawn from p(k) ∝ 0.5^k (pretrain.py).
2. Held-out statistics at every evaluation seed (sampling seeds no training run draws from,
   checked before anything runs): `--eval-samples` digits for each of `--eval-n` held-out
   prompts (never trained on): entropy of the pooled digits / ln 10, chi-square against
   uniform, and per-prompt distinct digits and entropy.
3. GRPO, once per training seed from the same start: reward = group_entropy (leave-one-out
   credit, normalised by ln 10) + a per-sample format reward (exactly one digit), on training
   prompts only.
4. The same statistics again; mean ± spread over the grid (training seeds × evaluation
   seeds) printed and written to <log.run_dir>/results.json, each run's files in seed<N>/.

`python examples/rng/run.py [--seeds 0 1 2] [--eval-seeds 12345 777 2024] [--set key=value ...]`
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

# imported as `rng.*` (examples/ on the path): plain `pretrain` / `task` would collide with
# other examples' modules of those names in one process (e.g. the test suite)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ar_common.seeds import add_seed_options, check_eval_seeds, grid_cells, line, summarise  # noqa: E402
from rng.pretrain import pretrain  # noqa: E402
from rng.task import make_prompts, sample_digits, statistics  # noqa: E402

from grpo_ar.adapters.text import TextAdapter  # noqa: E402
from grpo_ar.config import load_config  # noqa: E402
from grpo_ar.io.data import load_rows  # noqa: E402
from grpo_ar.train.trainer import Trainer  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "config.toml"
REWARDS = [
    {"name": "group_entropy", "args": {"pattern": r"^\s*(\d)\s*$", "categories": 10}},
    {"name": "regex_format", "args": {"pattern": r"\s*\d\s*", "full_match": True}},
]


def show(label: str, s: dict[str, float]) -> str:
    return (
        f"{label}: entropy {s['entropy']:.3f}·ln10, chi2 {s['chi2']:.1f} (p={s['chi2_p']:.3g}), "
        f"valid {s['valid']:.3f}, top digit {s['top_digit_frac']:.3f}, per prompt: "
        f"{s['per_prompt_distinct']:.2f} distinct of 10, entropy {s['per_prompt_entropy']:.3f}·ln10"
    )


SHOWN = {"entropy": ("pooled entropy / ln 10", 3), "chi2": ("chi-square vs uniform", 1), "chi2_p": ("chi-square p-value", 3),
         "top_digit_frac": ("top digit share", 3), "per_prompt_distinct": ("per prompt: distinct digits", 2),
         "per_prompt_entropy": ("per prompt: entropy / ln 10", 3), "valid": ("valid (one digit)", 3)}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="runs/rng_base", help="cache folder of the pre-trained model")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--eval-n", type=int, default=200, help="held-out prompts")
    ap.add_argument("--eval-samples", type=int, default=10, help="digits per held-out prompt")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    add_seed_options(ap)
    return ap.parse_args(argv)


def measure(model, tok, heldout: list[str], samples: int, eval_seeds: list[int]) -> dict:
    """{eval seed: statistics} of `samples` digits per held-out prompt (T = 1), each eval seed
    seeding the global generator `generate` draws from (`sample_digits`)."""
    return {e: statistics(sample_digits(model, tok, heldout, samples, seed=e)) for e in eval_seeds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0, load0 = time.perf_counter(), os.getloadavg()
    cfg = load_config(CONFIG, args.set)
    check_eval_seeds(args.eval_seeds, args.seeds, cfg.trainer.steps,
                     cfg.algorithm.dynamic_sampling_max_rounds)  # fmt: skip
    start, tok = pretrain(args.base, steps=args.pretrain_steps)
    train = load_rows([{"prompt": p} for p in make_prompts(1000, "train")], default_rewards=REWARDS)
    heldout = make_prompts(args.eval_n, "test")
    run_dir = Path(cfg.log.run_dir)
    before = measure(start, tok, heldout, args.eval_samples, args.eval_seeds)
    for e, s in before.items():
        print(show(f"held-out before GRPO, eval seed {e}", s), flush=True)
    after: dict[int, dict[int, dict[str, float]]] = {}
    runs = []
    for t in args.seeds:
        sets = [*args.set, f"trainer.seed={t}", f"log.run_dir={run_dir / f'seed{t}'}"]
        cfg_t = load_config(CONFIG, sets)
        model = copy.deepcopy(start)
        trainer = Trainer(cfg_t, model, TextAdapter(tok, cfg_t.sampling), train)
        t1 = time.perf_counter()
        history = trainer.train()
        runs.append({"seed": t, "steps": len(history), "grpo_seconds": time.perf_counter() - t1,
                     "load_end": os.getloadavg()[0]})  # fmt: skip
        after[t] = measure(model, tok, heldout, args.eval_samples, args.eval_seeds)
        for e, s in after[t].items():
            print(show(f"held-out after  GRPO, trainer.seed {t}, eval seed {e}", s), flush=True)
        print(f"GRPO trainer.seed {t}: {len(history)} steps in {runs[-1]['grpo_seconds']:.0f}s, "
              f"load {runs[-1]['load_end']:.1f}", flush=True)  # fmt: skip
    cells = grid_cells(before, after)
    result = {
        "protocol": {"heldout_prompts": heldout, "samples_per_prompt": args.eval_samples,
                     "train_seeds": args.seeds, "eval_seeds": args.eval_seeds, "config": args.set},
        "cells": cells, "summary": summarise(cells), "runs": runs,
        "seconds": time.perf_counter() - t0,
        "loadavg_1min": {"start": load0[0], "end": os.getloadavg()[0]},
        "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(result, indent=2))
    print(f"training seeds {args.seeds} x eval seeds {args.eval_seeds}: before (mean ± sd over eval "
          "seeds) -> after (mean ± sd over training seeds, each the mean over eval seeds)")  # fmt: skip
    for key, (label, digits) in SHOWN.items():
        print(line(label, result["summary"][key], digits))
    print(f"total {result['seconds']:.0f}s; load average {load0[0]:.1f} -> "
          f"{result['loadavg_1min']['end']:.1f}; results {run_dir / 'results.json'}")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
