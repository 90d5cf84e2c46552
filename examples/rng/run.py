"""RNG example: a tiny Llama pre-trained on skewed digits learns, with a group-level reward, to
emit uniformly distributed digits, and each prompt's samples stay diverse.

1. Pre-train (or reuse) the model on digits drawn from p(k) ∝ 0.5^k (pretrain.py).
2. Held-out statistics: 10 samples for each of `--eval-n` held-out prompts: entropy of the pooled
   digits / ln 10, chi-square against uniform, and per-prompt distinct digits and entropy.
3. GRPO: reward = group_entropy (leave-one-out credit, normalised by ln 10) + a per-sample
   format reward (exactly one digit), on training prompts only.
4. The same statistics again.

`python examples/rng/run.py [--seed S] [--set key=value ...]`
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# imported as `rng.*` (examples/ on the path): plain `pretrain` / `task` would collide with
# other examples' modules of those names in one process (e.g. the test suite)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="runs/rng_base", help="cache folder of the pre-trained model")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0, help="GRPO seed (trainer.seed)")
    ap.add_argument("--eval-n", type=int, default=200, help="held-out prompts, 10 samples each")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", default=None, help="write the statistics here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    model, tok = pretrain(args.base, steps=args.pretrain_steps)
    cfg = load_config(CONFIG, [f"trainer.seed={args.seed}", *args.set])
    train = load_rows([{"prompt": p} for p in make_prompts(1000, "train")], default_rewards=REWARDS)
    heldout = make_prompts(args.eval_n, "test")
    trainer = Trainer(cfg, model, TextAdapter(tok, cfg.sampling), train)
    before = statistics(sample_digits(model, tok, heldout, 10, seed=1234))
    print(show("held-out before GRPO", before))
    t1 = time.perf_counter()
    history = trainer.train()
    t_grpo = time.perf_counter() - t1
    after = statistics(sample_digits(model, tok, heldout, 10, seed=1234))
    print(show("held-out after  GRPO", after))
    print(
        f"GRPO: {len(history)} steps in {t_grpo:.0f}s (seed {args.seed}); total "
        f"{time.perf_counter() - t0:.0f}s; run directory {cfg.log.run_dir}"
    )
    out = {"before": before, "after": after}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
