"""Plan-then-image example: GRPO on a tiny AR model that writes a text plan, then the image tokens,
in one completion (T2I-R1's BiCoT), with a typed span for each part.

1. Pre-train (or reuse) the image example's VQ and classifier, a reward classifier and a prior
   over [BOS, prompt words, plan words, 64 codes] (pretrain.py, plans.py).
2. Build the model and the `plan_image` adapter from config.toml through the library's builder
   (the same path as `grpo-ar train`): spans `plan` (2 words) and `image` (64 codes), each with
   its own allowed tokens, sampling transform, loss weight and KL weight.
3. Measure on held-out prompts (never trained on) with every evaluation seed (--eval-seeds,
   never a random stream of training): reward, prompt constraint and plan-image consistency by
   the judge classifier, plan entropy, KL per span.
4. GRPO for every training seed of --seeds; with --ablation, also with the plan span's loss
   weight 0 (only the image span learns from the reward).
5. Measure again with every evaluation seed; print each (training seed, evaluation seed) cell
   and mean ± std (min..max) over them with the worst evaluation seed; results.json, grid PNG.

`python examples/plan_then_image/run.py [--seeds 0 1 2 | --seeds 0,1,2]
[--eval-seeds 12345 777 2024] [--ablation] [--set key=value ...]`
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/, as `plan_then_image.*`

from ar_common.runs import commit, parse_overrides, run_parser  # noqa: E402
from ar_common.seeds import (  # noqa: E402
    TRAIN_SEEDS,
    add_seed_options,
    check_eval_seeds,
    pm,
    stats,
    summarise,
    table,
)
from image_aesthetic.shapes import image_grid  # noqa: E402
from plan_then_image.plan_image import plan_image_scores  # noqa: E402  (registers plan_image)
from plan_then_image.plans import prompt_split  # noqa: E402
from plan_then_image.pretrain import pretrain  # noqa: E402

from grpo_ar.cli import build_model_and_adapter  # noqa: E402
from grpo_ar.config import Config, load_config  # noqa: E402
from grpo_ar.io.data import load_rows  # noqa: E402
from grpo_ar.train.trainer import Trainer  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "config.toml"
EXAMPLES = Path(__file__).resolve().parents[1]
KEYS = ("reward", "constraint", "consistency", "plan_valid", "aesthetic", "plan_entropy",
        "kl/plan", "kl/image")  # fmt: skip
# the summary's labels: quality (the "worst eval seed" is the smallest mean change) and shift
QUALITY = {"reward": "reward (reward classifier, max 3)", "constraint": "constraint (judge)",
           "consistency": "plan-image consistency (judge)",
           "plan_valid": "plan inside the prompt's families", "aesthetic": "aesthetic_proxy"}  # fmt: skip
SHIFT = {"plan_entropy": "plan span entropy, nats/token", "kl/plan": "KL to start, plan span",
         "kl/image": "KL to start, image span"}  # fmt: skip


def entries(prompts: list[str]) -> list:
    return load_rows([{"prompt": p} for p in prompts], default_rewards=[{"name": "plan_image"}])


@torch.no_grad()
def measure(model: Any, adapter: Any, start: Any, prompts: list[str], samples: int, seed: int,
            judge: Any, rcls: Any) -> tuple[dict[str, float], Tensor, list[str]]:  # fmt: skip
    """Held-out metrics over `samples` completions per prompt, sampled with a fixed seed:
    the reward (its own classifier), constraint / consistency / plan validity / aesthetic by the
    judge classifier, the plan span's mean token entropy (nats, under its transform) and
    KL(policy || start) per span, in nats per completion (Monte Carlo over the policy's samples)."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ro = adapter.sample(model, adapter.encode(entries(prompts)), samples, generator=gen)
    outputs = adapter.decode(ro)
    who = [p for p in prompts for _ in range(samples)]
    judged = plan_image_scores(judge, outputs, who)
    out = {k: float(v.mean()) for k, v in judged.items() if k != "reward"}
    out["reward"] = float(plan_image_scores(rcls, outputs, who)["reward"].mean())
    logp, ent = adapter.token_logprobs(model, ro, with_entropy=True)
    ref_logp, _ = adapter.token_logprobs(start, ro)
    m, plan = ro.completion_mask, ro.span_ids != adapter.image_index
    out["plan_entropy"] = float(ent[plan & m.bool()].mean())
    for name, sel in (("plan", plan), ("image", ~plan)):
        out[f"kl/{name}"] = float(((logp - ref_logp) * m * sel).sum(-1).mean())
    return out, adapter.decode_pixels(ro), adapter.plans(ro)


def one_run(cfg: Config, pre: dict[str, Any], args: Any,
            plan_weight: float | None) -> dict[str, Any]:  # fmt: skip
    """GRPO from the pre-trained prior under `cfg` (the plan span's loss weight replaced by
    `plan_weight` unless None); the metrics after it on the held-out prompts with every
    evaluation seed and, with the first, on the training prompts (in distribution)."""
    if plan_weight is not None:
        spans = tuple(replace(s, loss_weight=plan_weight) if s.name == "plan" else s
                      for s in cfg.sampling.spans)  # fmt: skip
        cfg = replace(cfg, sampling=replace(cfg.sampling, spans=spans))
    model, adapter = build_model_and_adapter(cfg)
    train_prompts, held = prompt_split()
    trainer = Trainer(cfg, model, adapter, entries(train_prompts))
    t0 = time.perf_counter()
    history = trainer.train()
    seconds = time.perf_counter() - t0
    after = {e: evaluate(model, adapter, pre, args, held, e) for e in args.eval_seeds}
    return {
        "seed": cfg.trainer.seed, "plan_loss_weight": [s.loss_weight for s in cfg.sampling.spans],
        "after": {e: m for e, (m, _, _) in after.items()},
        "images": after[args.eval_seeds[0]][1],
        "plans": after[args.eval_seeds[0]][2],
        "train_reward_first": history[0]["reward/mean"],
        "train_reward_last5": sum(h["reward/mean"] for h in history[-5:]) / len(history[-5:]),
        "steps": len(history), "seconds_grpo": seconds,
        "plans_after": {str(e): plan_counts(p, held, args.eval_samples)
                        for e, (_, _, p) in after.items()},
        "after_train_prompts":
            evaluate(model, adapter, pre, args, train_prompts, args.eval_seeds[0])[0],
    }  # fmt: skip


def evaluate(model: Any, adapter: Any, pre: dict[str, Any], args: Any, prompts: list[str],
             seed: int) -> tuple[dict[str, float], Tensor, list[str]]:  # fmt: skip
    """`measure` of `model` on `prompts` with evaluation seed `seed`, KL to the pre-trained prior."""
    return measure(model, adapter, pre["prior"], prompts, args.eval_samples, seed,
                   pre["classifier"], pre["reward_classifier"])  # fmt: skip


def plan_counts(plans: list[str], prompts: list[str], samples: int) -> dict[str, dict[str, int]]:
    """Held-out prompt -> {plan: how many of its `samples` completions wrote it}, most first."""
    out = {}
    for i, p in enumerate(prompts):
        got = Counter(plans[i * samples : (i + 1) * samples])
        out[p] = dict(got.most_common())
    return out


def seed_list(text: str) -> list[int]:
    """ "0,1,2" (the comma form of the first README) or "0" -> [0, 1, 2] / [0]."""
    try:
        return [int(s) for s in text.split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: seeds are integers, e.g. --seeds 0 1 2 or --seeds 0,1,2"
        ) from None


def parse_args(argv: list[str] | None) -> Any:
    ap = run_parser(__doc__, "runs/plan_then_image_base", "data vq cls rcls prior", "completions")
    add_seed_options(ap)
    # --seeds again, taking both "0 1 2" and the comma form "0,1,2" (a new group: it inherits the
    # "resolve" conflict handler add_seed_options set, the parser's own optionals do not)
    ap.add_argument_group("training seeds, either form").add_argument("--seeds", type=seed_list, nargs="+", default=[list(TRAIN_SEEDS)],
                    metavar="SEED", help="GRPO training seeds, one run each (0 1 2 or 0,1,2)")  # fmt: skip
    ap.add_argument("--ablation", action="store_true",
                    help="also run every seed with the plan span's loss weight 0")  # fmt: skip
    args = ap.parse_args(argv)
    args.seeds = [s for part in args.seeds for s in part]
    return args


def config(args: Any, base: Path) -> Config:
    """config.toml on the pre-trained folders under `base`, with the --set overrides."""
    cfg = load_config(CONFIG, [
        f"model.path={base / 'prior'}", f"plan_image.decoder_path={base / 'vq'}",
        f"model.adapter_path={EXAMPLES}", *args.set,
    ])  # fmt: skip
    setup = {"plan_image": {"classifier_path": str(base / "reward_classifier.safetensors")}}
    return replace(cfg, data=replace(cfg.data, reward_setup=setup))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0, load0, code = time.perf_counter(), os.getloadavg(), commit()  # the code that runs
    base = Path(args.base)
    pre = pretrain(base, **parse_overrides(args.pretrain_set))
    t_pre = time.perf_counter() - t0
    cfg = config(args, base)
    check_eval_seeds(args.eval_seeds, args.seeds, cfg.trainer.steps,
                     cfg.algorithm.dynamic_sampling_max_rounds)  # fmt: skip
    root = Path(cfg.log.run_dir)
    train_prompts, held = prompt_split()
    start, adapter = build_model_and_adapter(cfg)  # the pre-trained prior: "before" of every run
    before = {e: evaluate(start, adapter, pre, args, held, e) for e in args.eval_seeds}
    before_train = evaluate(start, adapter, pre, args, train_prompts, args.eval_seeds[0])[0]
    for e, (m, _, _) in before.items():
        print(f"held-out before GRPO, eval seed {e}: {_fmt(m)}", flush=True)
    variants = [("full", None)] + ([("plan_weight0", 0.0)] if args.ablation else [])
    results: dict[str, list[dict[str, Any]]] = {}
    cells: dict[str, list[dict[str, Any]]] = {}
    for name, weight in variants:
        results[name], cells[name] = [], []
        for seed in args.seeds:
            c = replace(cfg, trainer=replace(cfg.trainer, seed=seed),
                        log=replace(cfg.log, run_dir=str(root / f"{name}_seed{seed}")))  # fmt: skip
            r = one_run(c, pre, args, weight)
            for e in args.eval_seeds:
                cells[name].append({"train_seed": seed, "eval_seed": e,
                                    "before": before[e][0], "after": r["after"][e]})  # fmt: skip
                print(f"[{name} seed {seed}, eval seed {e}] held-out: {_fmt(r['after'][e])}",
                      flush=True)  # fmt: skip
            print(f"[{name} seed {seed}] training prompts (eval seed {args.eval_seeds[0]}): "
                  f"{_fmt(r['after_train_prompts'])}; GRPO {r['seconds_grpo']:.0f}s", flush=True)  # fmt: skip
            results[name].append(r)
    e0 = args.eval_seeds[0]
    first = results["full"][0]
    grid = _write_grid(root / "grid.png", before[e0][1], first["images"], args.eval_samples)
    load1 = os.getloadavg()
    strip = lambda r: {k: v for k, v in r.items() if k not in ("images", "plans")}  # noqa: E731
    result = {
        "seeds": args.seeds, "eval_seeds": args.eval_seeds, "commit": code,
        "before": {str(e): m for e, (m, _, _) in before.items()},
        "plans_before": {str(e): plan_counts(p, held, args.eval_samples)
                         for e, (_, _, p) in before.items()},
        "cells": cells, "summary": {n: summarise(cs, KEYS) for n, cs in cells.items()},
        "before_train_prompts": before_train,
        "after_train_prompts": {n: {k: stats([r["after_train_prompts"][k] for r in rs])
                                    for k in KEYS} for n, rs in results.items()},
        "runs": {n: [strip(r) for r in rs] for n, rs in results.items()},
        "grid": str(grid), "grid_plans": {"before": _grid_plans(before[e0][2], args),
                                          "after": _grid_plans(first["plans"], args)},
        "heldout_prompts": held, "train_prompts": train_prompts,
        "eval": {"samples": args.eval_samples, "seeds": args.eval_seeds,
                 "train_prompts_seed": e0},
        "seconds": {"pretrain": t_pre, "total": time.perf_counter() - t0},
        "loadavg_1min": {"start": load0[0], "end": load1[0]}, "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    (root / "results.json").write_text(json.dumps(result, indent=2))
    _report(result, grid)
    return result


def _report(result: dict[str, Any], grid: Path) -> None:
    """The tables the README pastes: per variant, mean ± std (min..max) over the cells."""
    n_seeds, n_eval = len(result["seeds"]), len(result["eval_seeds"])
    held = f"{len(result['heldout_prompts'])} prompts x {result['eval']['samples']}"
    for n, s in result["summary"].items():
        print(f"\n{n}: held-out ({held}), training seeds {result['seeds']} x eval seeds "
              f"{result['eval_seeds']} = {n_seeds * n_eval} cells, mean ± std (min..max):\n"
              f"{table(s, QUALITY)}\n{_shift_table(s)}")  # fmt: skip
    print(f"\ntraining prompts, eval seed {result['eval']['train_prompts_seed']}, before: "
          f"{_fmt(result['before_train_prompts'])}")  # fmt: skip
    for n, s in result["after_train_prompts"].items():
        print(f"training prompts after ({n}, over training seeds): "
              + "; ".join(f"{k} {pm(v)}" for k, v in s.items()))  # fmt: skip
    grpo = {n: [f"{r['seconds_grpo']:.0f}" for r in rs] for n, rs in result["runs"].items()}
    sec, load = result["seconds"], result["loadavg_1min"]
    print(f"commit {result['commit']}; GRPO s per run {grpo}; total {sec['total']:.0f}s "
          f"(pre-training {sec['pretrain']:.0f}s); load {load['start']:.1f} -> {load['end']:.1f}"
          f"; grid (row 1 before, row 2 after, eval seed {result['eval_seeds'][0]}): {grid}")  # fmt: skip


def _shift_table(s: dict[str, Any]) -> str:
    """How far the policy moved (no "worst" here: a larger change is not worse)."""
    lines = ["| held-out shift | before | after | change |", "| --- | --- | --- | --- |"]
    lines += [f"| {label} | {pm(s[k]['before'])} | {pm(s[k]['after'])} | {pm(s[k]['change'])} |"
              for k, label in SHIFT.items()]  # fmt: skip
    return "\n".join(lines)


def _fmt(m: dict[str, float]) -> str:
    return ", ".join(f"{k} {m[k]:.3f}" for k in KEYS)


def _grid_plans(plans: list[str], args: Any, per_prompt: int = 4) -> list[str]:
    k = min(per_prompt, args.eval_samples)
    return [plans[p * args.eval_samples + j] for p in range(len(plans) // args.eval_samples)
            for j in range(k)]  # fmt: skip


def _write_grid(path: Path, before: Tensor, after: Tensor, samples: int,
                per_prompt: int = 4) -> Path:  # fmt: skip
    """Row 1: the first `per_prompt` held-out images of every prompt before GRPO; row 2: the same
    prompts and sampling seeds after (seed 0)."""
    from PIL import Image

    k = min(per_prompt, samples)
    pick = torch.tensor([p * samples + j for p in range(len(before) // samples) for j in range(k)])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid([before[pick], after[pick]]).numpy()).save(path)
    return path


if __name__ == "__main__":
    main()
