"""Plan-then-image example: GRPO on a tiny AR model that writes a text plan, then the image tokens,
in one completion (T2I-R1's BiCoT), with a typed span for each part.

1. Pre-train (or reuse) the image example's VQ and classifier, a reward classifier and a prior
   over [BOS, prompt words, plan words, 64 codes] (pretrain.py, plans.py).
2. Build the model and the `plan_image` adapter from config.toml through the library's builder
   (the same path as `grpo-ar train`): spans `plan` (2 words) and `image` (64 codes), each with
   its own allowed tokens, sampling transform, loss weight and KL weight.
3. Measure on held-out prompts (never trained on) with fixed sampling seeds: reward, prompt
   constraint and plan-image consistency by the judge classifier, plan entropy, KL per span.
4. GRPO for every seed of --seeds; with --ablation, also with the plan span's loss weight 0
   (only the image span learns from the reward).
5. Measure again; print before -> after; results.json (per run and mean ± spread), grid PNG.

`python examples/plan_then_image/run.py [--seeds 0,1,2] [--ablation] [--set key=value ...]`
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/, as `plan_then_image.*`

from ar_common.runs import parse_overrides, run_parser  # noqa: E402
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


def one_run(cfg: Config, pre: dict[str, Any], args: Any, plan_weight: float | None,
            before: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    """GRPO from the pre-trained prior under `cfg` (the plan span's loss weight replaced by
    `plan_weight` unless None); the metrics before (measured once, shared) and after, on the
    held-out prompts and, with the same fixed seed, on the training prompts (in distribution)."""
    if plan_weight is not None:
        spans = tuple(replace(s, loss_weight=plan_weight) if s.name == "plan" else s
                      for s in cfg.sampling.spans)  # fmt: skip
        cfg = replace(cfg, sampling=replace(cfg.sampling, spans=spans))
    model, adapter = build_model_and_adapter(cfg)
    train_prompts, held = prompt_split()
    trainer = Trainer(cfg, model, adapter, entries(train_prompts))
    start = pre["prior"]

    def evaluate(prompts: list[str]) -> tuple[dict[str, float], Tensor, list[str]]:
        return measure(model, adapter, start, prompts, args.eval_samples, args.eval_seed,
                       pre["classifier"], pre["reward_classifier"])  # fmt: skip

    if before is None:
        m, img, plans = evaluate(held)
        before = {"metrics": m, "images": img, "plans": plans,
                  "train_prompts": evaluate(train_prompts)[0]}  # fmt: skip
    t0 = time.perf_counter()
    history = trainer.train()
    seconds = time.perf_counter() - t0
    after, img_after, plans_after = evaluate(held)
    return {
        "seed": cfg.trainer.seed, "plan_loss_weight": [s.loss_weight for s in cfg.sampling.spans],
        "before": before, "after": after, "images": img_after, "plans": plans_after,
        "train_reward_first": history[0]["reward/mean"],
        "train_reward_last5": sum(h["reward/mean"] for h in history[-5:]) / len(history[-5:]),
        "steps": len(history), "seconds_grpo": seconds,
        "plans_after": plan_counts(plans_after, held, args.eval_samples),
        "after_train_prompts": evaluate(train_prompts)[0],
    }  # fmt: skip


def plan_counts(plans: list[str], prompts: list[str], samples: int) -> dict[str, dict[str, int]]:
    """Held-out prompt -> {plan: how many of its `samples` completions wrote it}, most first."""
    out = {}
    for i, p in enumerate(prompts):
        got = Counter(plans[i * samples : (i + 1) * samples])
        out[p] = dict(got.most_common())
    return out


def summary(runs: list[dict[str, Any]], key: str = "after") -> dict[str, dict[str, float]]:
    """Per metric: mean, min and max of `r[key]` (after GRPO) over the runs (seeds)."""
    out = {}
    for k in KEYS:
        v = [r[key][k] for r in runs]
        out[k] = {"mean": statistics.fmean(v), "min": min(v), "max": max(v)}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = run_parser(__doc__, "runs/plan_then_image_base", "data vq cls rcls prior", "completions")
    ap.add_argument("--seeds", default="0", help="GRPO seeds, comma-separated (e.g. 0,1,2)")
    ap.add_argument("--ablation", action="store_true",
                    help="also run every seed with the plan span's loss weight 0")  # fmt: skip
    args = ap.parse_args(argv)
    t0, load0 = time.perf_counter(), os.getloadavg()
    base = Path(args.base)
    pre = pretrain(base, **parse_overrides(args.pretrain_set))
    t_pre = time.perf_counter() - t0
    cfg = load_config(CONFIG, [
        f"model.path={base / 'prior'}", f"plan_image.decoder_path={base / 'vq'}",
        f"model.adapter_path={EXAMPLES}", *args.set,
    ])  # fmt: skip
    setup = {"plan_image": {"classifier_path": str(base / "reward_classifier.safetensors")}}
    cfg = replace(cfg, data=replace(cfg.data, reward_setup=setup))
    root = Path(cfg.log.run_dir)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [("full", None)] + ([("plan_weight0", 0.0)] if args.ablation else [])
    before: Any = None  # measured in the first run, shared by all (same model, same seed)
    results: dict[str, list[dict[str, Any]]] = {}
    for name, weight in variants:
        runs = []
        for seed in seeds:
            c = replace(cfg, trainer=replace(cfg.trainer, seed=seed),
                        log=replace(cfg.log, run_dir=str(root / f"{name}_seed{seed}")))  # fmt: skip
            r = one_run(c, pre, args, weight, before)
            before = r["before"]
            print(f"[{name} seed {seed}] held-out: {_fmt(r['after'])}; training prompts: "
                  f"{_fmt(r['after_train_prompts'])}; GRPO {r['seconds_grpo']:.0f}s",
                  flush=True)  # fmt: skip
            runs.append(r)
        results[name] = runs
    first = results["full"][0]
    grid = _write_grid(root / "grid.png", before["images"], first["images"], args.eval_samples)
    load1 = os.getloadavg()
    strip = lambda r: {k: v for k, v in r.items() if k not in ("images", "before")}  # noqa: E731
    result = {
        "before": before["metrics"],
        "plans_before": plan_counts(before["plans"], prompt_split()[1], args.eval_samples),
        "after": {n: summary(rs) for n, rs in results.items()},
        "before_train_prompts": before["train_prompts"],
        "after_train_prompts": {n: summary(rs, "after_train_prompts") for n, rs in results.items()},
        "runs": {n: [strip(r) for r in rs] for n, rs in results.items()},
        "grid": str(grid), "grid_plans": {"before": _grid_plans(before["plans"], args),
                                          "after": _grid_plans(first["plans"], args)},
        "heldout_prompts": prompt_split()[1], "train_prompts": prompt_split()[0],
        "eval": {"samples": args.eval_samples, "seed": args.eval_seed},
        "seconds": {"pretrain": t_pre, "total": time.perf_counter() - t0},
        "loadavg_1min": {"start": load0[0], "end": load1[0]}, "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    (root / "results.json").write_text(json.dumps(result, indent=2))
    print(f"held-out before GRPO: {_fmt(before['metrics'])}\n"
          f"training prompts before GRPO: {_fmt(before['train_prompts'])}")  # fmt: skip
    for n, s in result["after"].items():
        print(f"after ({n}, seeds {args.seeds}): " + "; ".join(
            f"{k} {v['mean']:.3f} [{v['min']:.3f}, {v['max']:.3f}]" for k, v in s.items()))  # fmt: skip
    print(f"total {result['seconds']['total']:.0f}s (pre-training {t_pre:.0f}s), load "
          f"{load0[0]:.1f} -> {load1[0]:.1f}; grid (row 1 before, row 2 after): {grid}")  # fmt: skip
    return result


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
