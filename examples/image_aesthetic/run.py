"""AR image aesthetic example: GRPO makes a tiny text-to-image AR model's pictures score higher.

1. Pre-train (or reuse the cached) tiny VQModel, prompt classifier and Llama prior over VQ codes
   on procedural "colour shape" images (pretrain.py, shapes.py).
2. Build model + ImageAdapter from config.toml through the library (`grpo_ar.cli`'s builder:
   the same path as `grpo-ar train`), CFG on, text prompts as prefix tokens.
3. Measure on held-out prompts (never trained on by GRPO) with fixed sampling seeds: aesthetic
   score, prompt fidelity (the classifier recognises colour and shape), KL to the start model.
4. GRPO with `aesthetic_proxy` (or `aesthetic_laion` given --clip and --mlp) on the other prompts.
5. Measure again; print before -> after; write a before/after image grid PNG.

`python examples/image_aesthetic/run.py [--set key=value ...] [--clip DIR --mlp FILE]`
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# imported as `image_aesthetic.*` (examples/ on the path): plain `pretrain` would collide with
# other examples' modules of that name in one process (e.g. the test suite)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ar_common.runs import parse_overrides, run_parser  # noqa: E402
from image_aesthetic.pretrain import pretrain  # noqa: E402
from image_aesthetic.shapes import image_grid, parse_prompt, prompt_split  # noqa: E402

from grpo_ar.cli import build_model_and_adapter  # noqa: E402
from grpo_ar.config import load_config  # noqa: E402
from grpo_ar.io.data import load_rows  # noqa: E402
from grpo_ar.rewards.image import PROXY_COMPONENTS, aesthetic_proxy_score, proxy_components
from grpo_ar.train.trainer import Trainer  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "config.toml"


def entries(prompts: list[str], reward: str) -> list:
    return load_rows([{"prompt": p} for p in prompts], default_rewards=[{"name": reward}])


@torch.no_grad()
def measure(trainer: Trainer, ref: Any, prompts: list[str], samples: int, seed: int,
            classifier: Any, scorers: dict[str, Any]) -> tuple[dict[str, float], Tensor]:  # fmt: skip
    """Held-out metrics over `samples` images per prompt, sampled with a fixed seed (the same
    images before and after training differ only by the model): scores, classifier accuracy,
    KL(policy || ref) per image (sum over its tokens, Monte Carlo over the policy's samples)."""
    model, adapter = trainer.model, trainer.adapter
    model.eval()
    ents = entries(prompts, "aesthetic_proxy")
    gen = torch.Generator(device=trainer.device).manual_seed(seed)
    ro = adapter.sample(model, adapter.encode(ents).to(trainer.device), samples, generator=gen)
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
    return out, x


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = run_parser(__doc__, "runs/image_aesthetic_base", "data vq cls prior", "images")
    ap.add_argument("--clip", help="local CLIPModel folder: reward = aesthetic_laion (with --mlp)")
    ap.add_argument("--mlp", help="LAION aesthetic predictor v2 weights (.pth or .safetensors)")
    args = ap.parse_args(argv)
    if bool(args.clip) != bool(args.mlp):
        raise SystemExit("aesthetic_laion needs both --clip DIR and --mlp FILE")
    t0, load0 = time.perf_counter(), os.getloadavg()
    base = Path(args.base)
    pre = pretrain(base, **parse_overrides(args.pretrain_set))
    t_pre = time.perf_counter() - t0

    cfg = load_config(
        CONFIG, [f"model.path={base / 'prior'}", f"image.decoder_path={base / 'vq'}", *args.set]
    )
    scorers = {"aesthetic_proxy": lambda x: aesthetic_proxy_score(x, torch.ones(5))}
    reward = "aesthetic_proxy"
    if args.clip:
        from grpo_ar.rewards.image import LaionAesthetic

        reward = "aesthetic_laion"
        setup = {"clip_path": args.clip, "mlp_path": args.mlp, "device": "cpu"}
        cfg = replace(cfg, data=replace(cfg.data, reward_setup={reward: setup}))
        laion = LaionAesthetic(**setup)
        scorers[reward] = laion.score_images
    model, adapter = build_model_and_adapter(cfg)
    train_prompts, held_prompts = prompt_split()
    trainer = Trainer(cfg, model, adapter, entries(train_prompts, reward))
    start = copy.deepcopy(model).eval()  # the pre-trained model, for the KL and the grid

    def evaluate() -> tuple[dict[str, float], Tensor]:
        return measure(trainer, start, held_prompts, args.eval_samples, args.eval_seed,
                       pre["classifier"], scorers)  # fmt: skip

    before, img_before = evaluate()
    print(f"held-out before GRPO ({len(held_prompts)} prompts x {args.eval_samples}): "
          + _fmt(before, reward))  # fmt: skip
    t1 = time.perf_counter()
    history = trainer.train()
    t_grpo = time.perf_counter() - t1
    after, img_after = evaluate()
    print("held-out after  GRPO: " + _fmt(after, reward))
    gain = after[f"score/{reward}"] / before[f"score/{reward}"] - 1
    grid = _write_grid(Path(cfg.log.run_dir) / "grid.png", img_before, img_after, args.eval_samples)
    load1 = os.getloadavg()
    result = {
        "reward": reward, "before": before, "after": after, "relative_gain": gain,
        "train_reward_first": history[0]["reward/mean"],
        "train_reward_last5": sum(h["reward/mean"] for h in history[-5:]) / len(history[-5:]),
        "kl_last_step": history[-1].get("kl", 0.0), "steps": len(history),
        "seconds": {"pretrain": t_pre, "grpo": t_grpo, "total": time.perf_counter() - t0},
        "loadavg_1min": {"start": load0[0], "end": load1[0]}, "grid": str(grid),
        "heldout_prompts": held_prompts, "date": time.strftime("%Y-%m-%d"),
        "seed": cfg.trainer.seed,
    }  # fmt: skip
    (Path(cfg.log.run_dir) / "results.json").write_text(json.dumps(result, indent=2))
    s = result["seconds"]
    print(
        f"{reward} held-out {before[f'score/{reward}']:.3f} -> {after[f'score/{reward}']:.3f} "
        f"({gain:+.1%}); prompt fidelity {before['fidelity/both']:.3f} -> "
        f"{after['fidelity/both']:.3f}; KL to the start model {after['kl_to_start/per_image']:.2f} "
        f"nats/image ({after['kl_to_start/per_token']:.4f}/token)\n"
        f"GRPO: {len(history)} steps in {s['grpo']:.0f}s, train reward "
        f"{result['train_reward_first']:.3f} -> {result['train_reward_last5']:.3f} (last 5), k3 KL "
        f"of the last step {result['kl_last_step']:.4f}; pre-training {s['pretrain']:.0f}s; total "
        f"{s['total']:.0f}s; load average {load0[0]:.1f} -> {load1[0]:.1f}\n"
        f"grid (row 1 before, row 2 after; held-out prompts {', '.join(held_prompts)}): {grid}"
    )
    return result


def _fmt(m: dict[str, float], reward: str) -> str:
    extra = "".join(f", {k[6:]} {v:.3f}" for k, v in m.items() if k.startswith("score/")
                    and k != f"score/{reward}")  # fmt: skip
    return (
        f"{reward} {m[f'score/{reward}']:.3f}{extra}; fidelity colour {m['fidelity/colour']:.3f} "
        f"shape {m['fidelity/shape']:.3f} both {m['fidelity/both']:.3f}"
    )


def _write_grid(
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
