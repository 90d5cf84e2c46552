"""Janus text-to-image example: GRPO with CFG raises a learned PickScore-style reward of a tiny
`JanusForConditionalGeneration`, on the CPU, offline, with the prompt still followed.

1. Pre-train (or reuse the cached) tiny JanusVQVAE, Janus model, CLIP scorer and two colour/shape
   classifiers (the held-out judge and the reward's) on procedural "colour shape" images
   (pretrain.py).
2. Build model + `janus_t2i` adapter from config.toml through the library (`grpo_ar.cli`'s
   builder: the same path as `grpo-ar train`); the reward is the ensemble of config.toml:
   `pickscore` on the scorer's folder + `prompt_fidelity` (the reward classifier, not the judge).
3. Measure on held-out prompts (never trained on by GRPO) with each evaluation seed: PickScore,
   the aesthetic proxy, prompt fidelity (the judge recognises colour and shape), KL to the start.
4. GRPO once per training seed on the other prompts; measure again with every evaluation seed;
   print each (training seed, evaluation seed) cell and the mean ± std (min..max) over them;
   write results.json and before/after image grids.

`python examples/janus_t2i/run.py [--seeds 0 1 2] [--eval-seeds 12345 777 2024]
[--fidelity-weight W] [--set key=value ...] [--pretrain-set stage.key=value ...]`
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# imported as `janus_t2i.*` (examples/ on the path), as the image example does
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ar_common.runs import commit, parse_overrides, run_parser  # noqa: E402
from ar_common.seeds import add_seed_options, check_eval_seeds, summarise, table  # noqa: E402
from image_aesthetic import fidelity  # noqa: E402, F401  (registers the prompt_fidelity reward)
from image_aesthetic.run import entries, make_trainer, relative_gain, train_grid  # noqa: E402, F401
from image_aesthetic.shapes import parse_prompt, prompt_split  # noqa: E402
from janus_t2i.pretrain import pretrain  # noqa: E402

from grpo_ar.cli import build_model_and_adapter  # noqa: E402
from grpo_ar.config import load_config  # noqa: E402
from grpo_ar.io.data import load_rows  # noqa: E402
from grpo_ar.rewards.image import aesthetic_proxy_score  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "config.toml"
REWARD = "pickscore"
FIDELITY = "prompt_fidelity"
# what the summary reports, with its label in the printed table
HEADLINE = {
    f"score/{REWARD}": REWARD,
    "score/aesthetic_proxy": "aesthetic_proxy (the scorer's teacher)",
    "fidelity/both": "fidelity: colour and shape",
    "fidelity/colour": "fidelity: colour",
    "fidelity/shape": "fidelity: shape",
    "kl_to_start/per_image": "KL to start, nats/image",
}


def reward_specs(cfg: Any, fidelity_weight: float | None) -> list[dict]:
    """config.toml's ensemble; given `fidelity_weight`, prompt_fidelity at that weight (0 drops
    it)."""
    specs = []
    for spec in map(dict, cfg.data.rewards):
        if spec["name"] == FIDELITY and fidelity_weight is not None:
            if fidelity_weight == 0:
                continue
            spec["weight"] = fidelity_weight
        specs.append(spec)
    return specs


@torch.no_grad()
def measure(model: Any, adapter: Any, ref: Any, prompts: list[str], samples: int, seed: int,
            classifier: Any, scorer: Any) -> tuple[dict[str, float], Tensor, Tensor]:  # fmt: skip
    """Held-out metrics over `samples` images per prompt, sampled with a generator of its own
    seeded `seed` (the same noise before and after training): PickScore against the prompt, the
    aesthetic proxy (the scorer's preference teacher), the judge's accuracy, KL(policy || ref)
    per image (sum over its tokens, Monte Carlo over the policy's samples, both under the same
    CFG). -> (metrics, images, sampled code ids)."""
    model.eval()
    device = next(model.parameters()).device
    ents = load_rows([{"prompt": p} for p in prompts], default_rewards=[{"name": REWARD}])
    gen = torch.Generator(device=device).manual_seed(seed)
    ro = adapter.sample(model, adapter.encode(ents).to(device), samples, generator=gen)
    x = adapter.decode_pixels(ro).cpu()  # (P·G, 3, H, W) in [0, 1], prompt-major
    texts = [p for p in prompts for _ in range(samples)]
    target = torch.tensor([parse_prompt(p) for p in texts])
    out = {
        f"score/{REWARD}": float(scorer.score_images(x, texts).mean()),
        "score/aesthetic_proxy": float(aesthetic_proxy_score(x, torch.ones(5)).mean()),
    }
    out.update({f"fidelity/{k}": v for k, v in
                classifier.accuracy(x, target[:, 0], target[:, 1]).items()})  # fmt: skip
    logp = adapter.token_logprobs(model, ro)[0]
    ref_logp = adapter.token_logprobs(ref, ro)[0]
    diff = ((logp - ref_logp) * ro.completion_mask).sum(-1)
    out["kl_to_start/per_image"] = float(diff.mean())
    out["kl_to_start/per_token"] = float(diff.mean() / ro.completion_mask.sum(-1).mean())
    return out, x, ro.completion_ids.cpu()


def parse_args(argv: list[str] | None) -> Any:
    ap = run_parser(__doc__, "runs/janus_t2i_base", "data vq cls scorer janus rcls", "images")
    add_seed_options(ap)
    # 320 images per evaluation: a fidelity fraction near .15 then has a standard error of .02
    ap.set_defaults(eval_samples=32)
    ap.add_argument("--fidelity-weight", type=float, default=None,
                    help=f"weight of {FIDELITY} in the reward ensemble (default: config.toml's; "
                    f"0 = {REWARD} alone)")  # fmt: skip
    return ap.parse_args(argv)


def setup(args: Any, base: Path) -> tuple[Any, list[dict]]:
    """-> (config.toml with the model and the rewards' files pointed at the pre-training cache,
    reward specs)."""
    scorer = base / "scorer"
    cfg = load_config(CONFIG, [
        f"model.path={base / 'janus'}", f"data.reward_setup.{REWARD}.model={scorer}",
        f"data.reward_setup.{REWARD}.processor={scorer}", *args.set,
    ])  # fmt: skip
    setup = {FIDELITY: {"path": str(base / "reward_classifier.safetensors")}}
    specs = reward_specs(cfg, args.fidelity_weight)
    cfg = replace(cfg, data=replace(cfg.data, reward_setup={**cfg.data.reward_setup, **setup}))
    return cfg, specs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0, load0 = time.perf_counter(), os.getloadavg()
    base = Path(args.base)
    pre = pretrain(base, **parse_overrides(args.pretrain_set))
    t_pre = time.perf_counter() - t0
    cfg, specs = setup(args, base)
    check_eval_seeds(args.eval_seeds, args.seeds, cfg.trainer.steps,
                     cfg.algorithm.dynamic_sampling_max_rounds)  # fmt: skip
    start, adapter = build_model_and_adapter(cfg)
    start.eval()  # the pre-trained model: the KL's reference and every run's starting point
    train_prompts, held = prompt_split()
    assert not set(train_prompts) & set(held)
    run_dir = Path(cfg.log.run_dir)

    def evaluate(model: Any, seed: int) -> tuple[dict[str, float], Tensor, Tensor]:
        return measure(model, adapter, start, held, args.eval_samples, seed, pre["classifier"],
                       pre["scorer"])  # fmt: skip

    runs, cells, t_grpo = train_grid(
        args, cfg, start, adapter, entries(train_prompts, specs), len(held), evaluate, _fmt,
        _train_summary,
    )  # fmt: skip
    summary = summarise(cells, list(cells[0]["after"]))
    load1 = os.getloadavg()
    result = {
        "reward": REWARD, "rewards": specs, "seeds": args.seeds, "eval_seeds": args.eval_seeds,
        "settings": _settings(cfg), "cells": cells, "summary": summary, "runs": runs,
        "relative_gain": relative_gain(summary, f"score/{REWARD}"),
        "relative_gain_by_cell": [c["after"][f"score/{REWARD}"] / c["before"][f"score/{REWARD}"]
                                  - 1 for c in cells],  # fmt: skip
        "train_prompts": train_prompts, "heldout_prompts": held,
        "eval_samples": args.eval_samples, "date": time.strftime("%Y-%m-%d"), "commit": commit(),
        "seconds": {"pretrain": t_pre, "grpo": t_grpo, "total": time.perf_counter() - t0},
        "loadavg_1min": {"start": load0[0], "end": load1[0]},
        "pretrain_meta": {k: v for k, v in pre["meta"].items() if k != "settings"},
    }  # fmt: skip
    (run_dir / "results.json").write_text(json.dumps(result, indent=2))
    _report(result, table(summary, HEADLINE))
    return result


def _settings(cfg: Any) -> dict[str, Any]:
    a, t = cfg.algorithm, cfg.trainer
    return {"beta": a.beta, "loss_args": dict(a.loss_args), "steps": t.steps, "lr": t.lr,
            "batch_size": t.batch_size, "group_size": a.group_size,
            "multi_objective": a.multi_objective, "cfg_scale": cfg.sampling.cfg_scale}  # fmt: skip


def _train_summary(history: list[dict[str, float]], seconds: float) -> dict[str, float]:
    last = history[-5:]
    out = {"steps": len(history), "seconds": seconds, "kl_last_step": history[-1].get("kl", 0.0)}
    for k in ("reward/mean", *(k for k in history[0] if k.startswith("reward/") and
                               k.endswith("/mean") and k != "reward/mean")):  # fmt: skip
        out[f"{k} first"] = history[0][k]
        out[f"{k} last5"] = sum(h[k] for h in last) / len(last)
    return out


def _report(result: dict[str, Any], tab: str) -> None:
    s, n, st = result["seconds"], len(result["cells"]), result["settings"]
    rewards = " + ".join(f"{r.get('weight', 1.0):g}·{r['name']}" for r in result["rewards"])
    cell_gain = result["relative_gain_by_cell"]
    print(
        f"\nreward {rewards} ({st['multi_objective']}); beta {st['beta']}, {st['steps']} steps, "
        f"lr {st['lr']}, loss args {st['loss_args'] or 'default'}\n"
        f"held-out ({len(result['heldout_prompts'])} prompts x {result['eval_samples']} images), "
        f"training seeds {result['seeds']} x eval seeds {result['eval_seeds']} = {n} cells, "
        f"mean ± std (min..max) over the cells:\n{tab}\n"
        f"{REWARD} relative gain of the mean: {result['relative_gain']['mean']:+.1%} "
        f"(per cell {min(cell_gain):+.1%}..{max(cell_gain):+.1%})\n"
        f"GRPO {', '.join(f'{x:.0f}' for x in s['grpo'])}s per training seed; pre-training "
        f"{s['pretrain']:.0f}s; total {s['total']:.0f}s; load average "
        f"{result['loadavg_1min']['start']:.1f} -> {result['loadavg_1min']['end']:.1f}"
    )


def _fmt(m: dict[str, float]) -> str:
    return (
        f"{REWARD} {m[f'score/{REWARD}']:.3f}, aesthetic_proxy {m['score/aesthetic_proxy']:.3f}; "
        f"fidelity colour {m['fidelity/colour']:.3f} shape {m['fidelity/shape']:.3f} "
        f"both {m['fidelity/both']:.3f}; KL {m['kl_to_start/per_image']:.2f}"
    )


if __name__ == "__main__":
    main()
