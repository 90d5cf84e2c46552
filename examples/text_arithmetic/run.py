"""The main demo: a tiny Llama starts weak at arithmetic, GRPO raises its held-out accuracy.

1. Pre-train (or reuse the cached) tiny char-level Llama briefly on `a+b=` problems (pretrain.py).
2. Measure held-out accuracy (greedy and sampled) with grpo_ar's own evaluation.
3. GRPO with the `numeric_answer` reward on training problems only.
4. Measure the same held-out accuracy again and print before -> after.

`python examples/text_arithmetic/run.py [--steps N] [--set key=value ...]`
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrain import TASK, pretrain  # noqa: E402
from task import make_problems  # noqa: E402

from grpo_ar.adapters.text import TextAdapter  # noqa: E402
from grpo_ar.config import load_config  # noqa: E402
from grpo_ar.io.data import load_rows  # noqa: E402
from grpo_ar.train.trainer import Trainer  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "config.toml"


def rows_to_entries(rows: list[dict[str, str]]) -> list:
    return load_rows(
        rows,
        default_rewards=[{"name": "numeric_answer", "args": {"answer": "$answer", "mode": "last"}}],
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
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
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    kw = {} if args.pretrain_steps is None else {"steps": args.pretrain_steps}
    model, tok = pretrain(args.base, **kw)
    cfg = load_config(CONFIG, args.set)
    train = rows_to_entries(make_problems(4000, cfg.trainer.seed, "train", **TASK))
    heldout = rows_to_entries(
        make_problems(args.eval_n, cfg.trainer.seed + 1, "test", unique=True, **TASK)
    )
    trainer = Trainer(cfg, model, TextAdapter(tok, cfg.sampling), train)

    def measure() -> tuple[float, float]:
        greedy = trainer.evaluate(heldout, greedy=True, batch_size=100)[
            "eval/greedy/numeric_answer"
        ]
        sampled = trainer.evaluate(heldout, greedy=False, samples=4, batch_size=100)
        return greedy, sampled["eval/sampled/numeric_answer"]

    before = measure()
    print(
        f"held-out accuracy before GRPO: greedy {before[0]:.3f}, sampled {before[1]:.3f}  (n={len(heldout)})"
    )
    t1 = time.perf_counter()
    history = trainer.train()
    t_grpo = time.perf_counter() - t1
    after = measure()
    print(f"held-out accuracy after  GRPO: greedy {after[0]:.3f}, sampled {after[1]:.3f}")
    print(
        f"GRPO: {len(history)} steps in {t_grpo:.0f}s, train reward {history[0]['reward/mean']:.3f} -> "
        f"{sum(h['reward/mean'] for h in history[-5:]) / 5:.3f} (last 5), "
        f"KL to reference {history[-1].get('kl', 0.0):.4f}; total {time.perf_counter() - t0:.0f}s; "
        f"run directory {cfg.log.run_dir}"
    )
    return {
        "greedy_before": before[0],
        "greedy_after": after[0],
        "sampled_before": before[1],
        "sampled_after": after[1],
    }


if __name__ == "__main__":
    main()
