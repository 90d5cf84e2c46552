"""The demo task (run.py's model, data and config) trained with flat groups and with tree-sampled
groups, three seeds each: held-out accuracy and the rollout compute it took.

Variants (all 80 GRPO steps of config.toml, 16 prompts a step):
  flat     G = 8 independent samples, `grpo` advantages (the demo as it ships);
  tree8    G = 8 as one binary tree of depth 3 forking after every token, `treepo`;
  tree8_grpo  the same trees, plain `grpo` over the leaves;
  tree8_entropy  G = 8, forking (up to 3 times) before any token whose entropy is > 0.3 nats;
  tree24   G = 24 as three such trees (about the flat variant's rollout tokens: answers are
           2-3 tokens + EOS, so most rows end near the last fork), `treepo`.
Rollout tokens = tokens the model computed while sampling during training: the prompts plus
every decoded row-step (a flat sampler with perfect compaction decodes each completion's
tokens; a tree decodes each segment once).

    python examples/text_arithmetic/tree_vs_flat.py [--seeds 0 1 2] [--steps 80]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrain import TASK, pretrain  # noqa: E402
from run import CONFIG, rows_to_entries  # noqa: E402
from task import make_problems  # noqa: E402

from grpo_ar.adapters.text import TextAdapter  # noqa: E402
from grpo_ar.config import load_config  # noqa: E402
from grpo_ar.train.trainer import Trainer  # noqa: E402

TREE = ["sampling.tree.branching=2", "sampling.tree.depth=3", "sampling.tree.segment_tokens=1"]
VARIANTS = {
    "flat": [],
    "tree8": [*TREE, "algorithm.advantage=treepo"],
    "tree8_grpo": TREE,
    "tree8_entropy": ["sampling.tree.branching=2", "sampling.tree.depth=3",
                      "sampling.tree.fork_entropy=0.3", "algorithm.advantage=treepo"],
    "tree24": [*TREE, "algorithm.advantage=treepo", "algorithm.group_size=24"],
}  # fmt: skip


class CountingAdapter(TextAdapter):
    """TextAdapter that adds up the model tokens its training rollouts computed."""

    counting = False
    tokens = 0

    def sample(self, model, prompts, group_size, generator=None, greedy=False):
        r = super().sample(model, prompts, group_size, generator=generator, greedy=greedy)
        if self.counting:
            stats = r.extras.get("tree_stats")
            decoded = stats["decoded_tokens"] if stats else int(r.lengths.sum())
            self.tokens += int(prompts.attention_mask.sum()) + decoded
        return r


def one(variant: str, seed: int, steps: int, base: str, eval_n: int) -> dict[str, float]:
    model, tok = pretrain(base, verbose=False)
    sets = [f"trainer.seed={seed}", f"trainer.steps={steps}", "log.progress=false",
            f"log.run_dir=runs/tree_vs_flat/{variant}_{seed}", "log.overwrite=true",
            *VARIANTS[variant]]  # fmt: skip
    cfg = load_config(CONFIG, sets)
    train = rows_to_entries(make_problems(4000, seed, "train", **TASK))
    heldout = rows_to_entries(make_problems(eval_n, 1, "test", unique=True, **TASK))
    adapter = CountingAdapter(tok, cfg.sampling)
    trainer = Trainer(cfg, model, adapter, train)
    adapter.counting = True
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    adapter.counting = False
    greedy = trainer.evaluate(heldout, greedy=True, batch_size=100)["eval/greedy/numeric_answer"]
    sampled = trainer.evaluate(heldout, greedy=False, samples=4, batch_size=100)
    return {
        "greedy": greedy, "sampled": sampled["eval/sampled/numeric_answer"],
        "rollout_tokens": adapter.tokens, "seconds": seconds,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--variants", nargs="+", default=["flat", "tree8", "tree24"])
    ap.add_argument("--base", default="runs/arith_base")
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out: dict[str, list[dict[str, float]]] = {}
    for v in args.variants:
        for s in args.seeds:
            r = one(v, s, args.steps, args.base, args.eval_n)
            out.setdefault(v, []).append(r)
            print(f"{v} seed {s}: " + ", ".join(f"{k} {x:.3f}" for k, x in r.items()), flush=True)
    print("| variant | greedy (per seed) | sampled (per seed) | rollout tokens (mean) |")
    print("| --- | --- | --- | --- |")
    for v, rs in out.items():
        fmt = lambda k, rs=rs: " / ".join(f"{r[k]:.3f}" for r in rs)  # noqa: E731
        mean_tokens = statistics.mean(r["rollout_tokens"] for r in rs)
        print(f"| {v} | {fmt('greedy')} | {fmt('sampled')} | {mean_tokens:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
