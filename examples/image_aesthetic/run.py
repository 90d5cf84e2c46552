"""AR image aesthetic example: GRPO makes a tiny text-to-image AR model's pictures score higher.

1. Pre-train (or reuse the cached) tiny VQModel, two prompt classifiers (the held-out judge and
   the reward's) and Llama prior over VQ codes on procedural "colour shape" images (pretrain.py,
   shapes.py).
2. Build model + ImageAdapter from config.toml through the library (`grpo_ar.cli`'s builder:
   the same path as `grpo-ar train`), CFG on, text prompts as prefix tokens.
3. Measure on held-out prompts (never trained on by GRPO) with each evaluation seed: aesthetic
   score, prompt fidelity (the judge classifier recognises colour and shape), KL to the start.
4. GRPO, once per training seed, on the other prompts with the reward ensemble of config.toml:
   `aesthetic_proxy` (or `aesthetic_laion` given --clip and --mlp) + `prompt_fidelity`
   (fidelity.py: the reward classifier, not the judge).
5. Measure again with every evaluation seed; print each (training seed, evaluation seed) cell
   and the mean ± std (min..max) over them; write before/after image grids.

`python examples/image_aesthetic/run.py [--seeds 0 1 2] [--eval-seeds 12345 777 2024]
[--fidelity-weight W] [--set key=value ...] [--clip DIR --mlp FILE]`
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# imported as `image_aesthetic.*` (examples/ on the path): plain `pretrain` would collide with
# other examples' modules of that name in one process (e.g. the test suite)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ar_common.runs import parse_overrides, run_parser  # noqa: E402
from ar_common.seeds import add_seed_options, check_eval_seeds, summarise, table  # noqa: E402
from image_aesthetic import fidelity  # noqa: E402, F401  (registers the prompt_fidelity reward)
from image_aesthetic.pretrain import pretrain  # noqa: E402
from image_aesthetic.shapes import image_grid, parse_prompt, prompt_split  # noqa: E402

from grpo_ar.cli import build_model_and_adapter  # noqa: E402
from grpo_ar.config import load_config  # noqa: E402
from grpo_ar.io.data import load_rows  # noqa: E402
from grpo_ar.rewards.image import PROXY_COMPONENTS, aesthetic_proxy_score, proxy_components
from grpo_ar.train.trainer import Trainer  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "config.toml"
# what the summary reports, with its label in the printed table
HEADLINE = {
    "score/{reward}": "{reward}",
    "fidelity/both": "fidelity: colour and shape",
    "fidelity/shape": "fidelity: shape",
    "fidelity/colour": "fidelity: colour",
    "kl_to_start/per_image": "KL to start, nats/image",
}


def entries(prompts: list[str], rewards: list[dict]) -> list:
    """Rows {prompt, colour, shape} under the reward specs (their "$colour" reads the row)."""
    rows = [dict(zip(("colour", "shape"), parse_prompt(p)), prompt=p) for p in prompts]
    return load_rows(rows, default_rewards=rewards)


def reward_specs(cfg: Any, aesthetic: str, fidelity_weight: float | None) -> list[dict]:
    """config.toml's ensemble with the aesthetic reward named `aesthetic` and, given
    `fidelity_weight`, prompt_fidelity at that weight (0 drops it)."""
    specs = []
    for spec in cfg.data.rewards:
        spec = dict(spec)
        if spec["name"] == "aesthetic_proxy":
            spec["name"] = aesthetic
        if spec["name"] == "prompt_fidelity" and fidelity_weight is not None:
            if fidelity_weight == 0:
                continue
            spec["weight"] = fidelity_weight
        specs.append(spec)
    return specs


@torch.no_grad()
def measure(model: Any, adapter: Any, ref: Any, prompts: list[str], samples: int, seed: int,
            classifier: Any, scorers: dict[str, Any]) -> tuple[dict, Tensor, Tensor]:  # fmt: skip
    """Held-out metrics over `samples` images per prompt, sampled with a generator of its own
    seeded `seed` (the same noise before and after training: images differ only by the model):
    scores, judge-classifier accuracy, KL(policy || ref) per image (sum over its tokens, Monte
    Carlo over the policy's samples). -> (metrics, images, sampled token ids)."""
    model.eval()
    device = next(model.parameters()).device
    ents = load_rows(
        [{"prompt": p} for p in prompts], default_rewards=[{"name": "aesthetic_proxy"}]
    )
    gen = torch.Generator(device=device).manual_seed(seed)
    ro = adapter.sample(model, adapter.encode(ents).to(device), samples, generator=gen)
    x = adapter.decode_pixels(ro).cpu()  # (P·G, 3, H, W) in [0, 1], prompt-major
    target = torch.tensor([parse_prompt(p) for p in prompts]).repeat_interleave(samples, 0)
    out = {f"score/{k}": float(fn(x).mean()) for k, fn in scorers.items()}
    parts = proxy_components(x).mean(0).tolist()  # what the proxy's mean is made of
    out.update({f"proxy/{k}": v for k, v in zip(PROXY_COMPONENTS, parts)})
    out.update({f"fidelity/{k}": v for k, v in
                classifier.accuracy(x, target[:, 0], target[:, 1]).items()})  # fmt: skip
    logp = adapter.token_logprobs(model, ro)[0]
    ref_logp = adapter.token_logprobs(ref, ro)[0]
    diff = ((logp - ref_logp) * ro.completion_mask).sum(-1)
    out["kl_to_start/per_image"] = float(diff.mean())
    out["kl_to_start/per_token"] = float(diff.mean() / ro.completion_mask.sum(-1).mean())
    return out, x, ro.completion_ids.cpu()


def parse_args(argv: list[str] | None) -> Any:
    ap = run_parser(__doc__, "runs/image_aesthetic_base", "data vq cls prior rcls", "images")
    add_seed_options(ap)
    # 320 images per evaluation: a fidelity fraction near .7 then has a standard error of .026
    ap.set_defaults(eval_samples=32)
    ap.add_argument("--fidelity-weight", type=float, default=None,
                    help="weight of prompt_fidelity in the reward ensemble (default: "
                    "config.toml's; 0 = aesthetic reward alone)")  # fmt: skip
    ap.add_argument("--clip", help="local CLIPModel folder: reward = aesthetic_laion (with --mlp)")
    ap.add_argument("--mlp", help="LAION aesthetic predictor v2 weights (.pth or .safetensors)")
    args = ap.parse_args(argv)
    if bool(args.clip) != bool(args.mlp):
        raise SystemExit("aesthetic_laion needs both --clip DIR and --mlp FILE")
    return args


def setup(args: Any, base: Path) -> tuple[Any, str, dict[str, Any], list[dict]]:
    """-> (config, GRPO's aesthetic reward name, scorers of held-out images, reward specs)."""
    cfg = load_config(
        CONFIG, [f"model.path={base / 'prior'}", f"image.decoder_path={base / 'vq'}", *args.set]
    )
    scorers = {"aesthetic_proxy": lambda x: aesthetic_proxy_score(x, torch.ones(5))}
    reward = "aesthetic_proxy"
    reward_setup = {"prompt_fidelity": {"path": str(base / "reward_classifier.safetensors")}}
    if args.clip:
        from grpo_ar.rewards.image import LaionAesthetic

        reward = "aesthetic_laion"
        reward_setup[reward] = {"clip_path": args.clip, "mlp_path": args.mlp, "device": "cpu"}
        scorers[reward] = LaionAesthetic(**reward_setup[reward]).score_images
    specs = reward_specs(cfg, reward, args.fidelity_weight)
    cfg = replace(
        cfg, data=replace(cfg.data, reward_setup={**cfg.data.reward_setup, **reward_setup})
    )
    return cfg, reward, scorers, specs


def make_trainer(cfg: Any, seed: int, start: Any, adapter: Any, train: list) -> Trainer:
    """A Trainer of a copy of `start` on `train` entries with training seed `seed`, writing
    under run_dir/seed<seed>/."""
    run_dir = str(Path(cfg.log.run_dir) / f"seed{seed}")
    cfg = replace(
        cfg, trainer=replace(cfg.trainer, seed=seed), log=replace(cfg.log, run_dir=run_dir)
    )
    return Trainer(cfg, copy.deepcopy(start), adapter, train)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0, load0 = time.perf_counter(), os.getloadavg()
    base = Path(args.base)
    pre = pretrain(base, **parse_overrides(args.pretrain_set))
    t_pre = time.perf_counter() - t0
    cfg, reward, scorers, specs = setup(args, base)
    check_eval_seeds(args.eval_seeds, args.seeds, cfg.trainer.steps,
                     cfg.algorithm.dynamic_sampling_max_rounds)  # fmt: skip
    start, adapter = build_model_and_adapter(cfg)
    start.eval()  # the pre-trained model: the KL's reference and every run's starting point
    train_prompts, held = prompt_split()
    run_dir = Path(cfg.log.run_dir)

    def evaluate(model: Any, seed: int) -> tuple[dict[str, float], Tensor, Tensor]:
        return measure(model, adapter, start, held, args.eval_samples, seed, pre["classifier"],
                       scorers)  # fmt: skip

    runs, cells, t_grpo = train_grid(
        args, cfg, start, adapter, entries(train_prompts, specs), len(held), evaluate,
        lambda m: _fmt(m, reward), _train_summary,
    )  # fmt: skip
    labels = {k.format(reward=reward): v.format(reward=reward) for k, v in HEADLINE.items()}
    summary = summarise(cells, list(cells[0]["after"]))
    load1 = os.getloadavg()
    result = {
        "reward": reward, "rewards": specs, "seeds": args.seeds, "eval_seeds": args.eval_seeds,
        "settings": _settings(cfg), "cells": cells, "summary": summary, "runs": runs,
        "relative_gain": relative_gain(summary, f"score/{reward}"), "heldout_prompts": held,
        "eval_samples": args.eval_samples, "date": time.strftime("%Y-%m-%d"),
        "seconds": {"pretrain": t_pre, "grpo": t_grpo, "total": time.perf_counter() - t0},
        "loadavg_1min": {"start": load0[0], "end": load1[0]},
    }  # fmt: skip
    (run_dir / "results.json").write_text(json.dumps(result, indent=2))
    _report(result, table(summary, labels), reward)
    return result


def train_grid(
    args: Any, cfg: Any, start: Any, adapter: Any, train: list, n_held: int,
    evaluate: Callable[[Any, int], tuple[dict[str, float], Tensor, Any]],
    fmt: Callable[[dict[str, float]], str],
    train_summary: Callable[[list[dict[str, float]], float], dict[str, float]],
) -> tuple[dict[int, dict[str, float]], list[dict[str, Any]], list[float]]:  # fmt: skip
    """The 3 x 3 protocol of an image example: `start` measured on every evaluation seed, then one
    GRPO run from it per training seed (`args.seeds`), each measured on every evaluation seed
    (`evaluate(model, seed)` -> (metrics, images, _)), a before/after grid per cell under
    log.run_dir. Returns (train_summary per training seed, the cells, GRPO seconds per run)."""
    run_dir = Path(cfg.log.run_dir)
    before = {e: evaluate(start, e) for e in args.eval_seeds}
    for e, (m, _, _) in before.items():
        print(f"held-out before GRPO, eval seed {e} ({n_held} prompts x {args.eval_samples}): "
              + fmt(m), flush=True)  # fmt: skip
    runs, cells, t_grpo = {}, [], []
    for seed in args.seeds:
        trainer = make_trainer(cfg, seed, start, adapter, train)
        t1 = time.perf_counter()
        history = trainer.train()
        t_grpo.append(time.perf_counter() - t1)
        runs[seed] = train_summary(history, t_grpo[-1])
        for e in args.eval_seeds:
            after, img, _ = evaluate(trainer.model, e)
            grid = write_grid(run_dir / f"grid_seed{seed}_eval{e}.png", before[e][1], img,
                              args.eval_samples)  # fmt: skip
            cells.append({"train_seed": seed, "eval_seed": e, "before": before[e][0],
                          "after": after, "grid": str(grid)})  # fmt: skip
            print(f"training seed {seed}, eval seed {e}, after GRPO: " + fmt(after), flush=True)
    return runs, cells, t_grpo


def _settings(cfg: Any) -> dict[str, Any]:
    a, t = cfg.algorithm, cfg.trainer
    return {"beta": a.beta, "loss_args": dict(a.loss_args), "steps": t.steps, "lr": t.lr,
            "batch_size": t.batch_size, "group_size": a.group_size}  # fmt: skip


def _train_summary(history: list[dict[str, float]], seconds: float) -> dict[str, float]:
    last = history[-5:]
    out = {"steps": len(history), "seconds": seconds, "kl_last_step": history[-1].get("kl", 0.0)}
    for k in ("reward/mean", *(k for k in history[0] if k.startswith("reward/") and
                               k.endswith("/mean"))):  # fmt: skip
        out[f"{k} first"] = history[0][k]
        out[f"{k} last5"] = sum(h[k] for h in last) / len(last)
    return out


def relative_gain(summary: dict[str, Any], key: str) -> dict[str, float]:
    """Relative gain of the mean score over all cells."""
    return {"mean": summary[key]["after"]["mean"] / summary[key]["before"]["mean"] - 1}


def _report(result: dict[str, Any], tab: str, reward: str) -> None:
    s, n = result["seconds"], len(result["cells"])
    rewards = " + ".join(f"{r.get('weight', 1.0):g}·{r['name']}" for r in result["rewards"])
    st = result["settings"]
    print(
        f"\nreward {rewards}; beta {st['beta']}, {st['steps']} steps, lr {st['lr']}, "
        f"loss args {st['loss_args'] or 'default'}\n"
        f"held-out ({len(result['heldout_prompts'])} prompts x {result['eval_samples']} images), "
        f"training seeds {result['seeds']} x eval seeds {result['eval_seeds']} = {n} cells, "
        f"mean ± std (min..max) over the cells:\n{tab}\n"
        f"{reward} relative gain of the mean: {result['relative_gain']['mean']:+.1%}\n"
        f"GRPO {', '.join(f'{x:.0f}' for x in s['grpo'])}s per training seed; pre-training "
        f"{s['pretrain']:.0f}s; total {s['total']:.0f}s; load average "
        f"{result['loadavg_1min']['start']:.1f} -> {result['loadavg_1min']['end']:.1f}"
    )


def _fmt(m: dict[str, float], reward: str) -> str:
    extra = "".join(f", {k[6:]} {v:.3f}" for k, v in m.items() if k.startswith("score/")
                    and k != f"score/{reward}")  # fmt: skip
    return (
        f"{reward} {m[f'score/{reward}']:.3f}{extra}; fidelity colour {m['fidelity/colour']:.3f} "
        f"shape {m['fidelity/shape']:.3f} both {m['fidelity/both']:.3f}; KL "
        f"{m['kl_to_start/per_image']:.2f}"
    )


def write_grid(
    path: Path, before: Tensor, after: Tensor, samples: int, per_prompt: int = 2
) -> Path:
    """Row 1: the first `per_prompt` held-out images of every prompt before GRPO; row 2: the same
    prompts and sampling seeds after."""
    from PIL import Image

    k = min(per_prompt, samples)
    pick = torch.tensor([p * samples + j for p in range(len(before) // samples) for j in range(k)])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid([before[pick], after[pick]]).numpy()).save(path)
    return path


if __name__ == "__main__":
    main()
