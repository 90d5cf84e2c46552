"""Janus text-to-image example: GRPO with CFG raises a learned PickScore-style reward of a tiny
`JanusForConditionalGeneration`, on the CPU, offline.

1. Pre-train (or reuse the cached) tiny JanusVQVAE, Janus model, CLIP scorer and the image
   example's colour/shape classifier on procedural "colour shape" images (pretrain.py).
2. Build model + `janus_t2i` adapter from config.toml through the library (`grpo_ar.cli`'s
   builder: the same path as `grpo-ar train`); the reward is `pickscore` on the scorer's folder.
3. Measure on held-out prompts (never trained on by GRPO) with a fixed sampling seed: PickScore,
   prompt fidelity (the classifier recognises colour and shape), KL to the start model.
4. GRPO on the other prompts; measure again; print before -> after; write results.json and a
   before/after image grid.

`python examples/janus_t2i/run.py [--set key=value ...] [--pretrain-set stage.key=value ...]`
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# imported as `janus_t2i.*` (examples/ on the path), as the image example does
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ar_common.runs import parse_overrides, run_parser  # noqa: E402
from image_aesthetic.shapes import image_grid, parse_prompt, prompt_split  # noqa: E402
from janus_t2i.pretrain import pretrain  # noqa: E402

from grpo_ar.cli import build_model_and_adapter  # noqa: E402
from grpo_ar.config import load_config  # noqa: E402
from grpo_ar.io.data import load_rows  # noqa: E402
from grpo_ar.rewards.image import aesthetic_proxy_score  # noqa: E402
from grpo_ar.train.trainer import Trainer  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "config.toml"
REWARD = "pickscore"


def entries(prompts: list[str]) -> list:
    return load_rows([{"prompt": p} for p in prompts], default_rewards=[{"name": REWARD}])


@torch.no_grad()
def measure(trainer: Trainer, ref: Any, prompts: list[str], samples: int, seed: int,
            classifier: Any, scorer: Any) -> tuple[dict[str, float], Tensor]:  # fmt: skip
    """Held-out metrics over `samples` images per prompt, sampled with a fixed seed: PickScore
    against the prompt, the aesthetic proxy (the scorer's preference teacher), classifier
    accuracy, KL(policy || ref) per image (sum over its tokens, Monte Carlo over the policy's
    samples, both under the same CFG)."""
    model, adapter = trainer.model, trainer.adapter
    model.eval()
    gen = torch.Generator(device=trainer.device).manual_seed(seed)
    ro = adapter.sample(model, adapter.encode(entries(prompts)).to(trainer.device), samples,
                        generator=gen)  # fmt: skip
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
    return out, x


def build(base: Path, sets: list[str]) -> Any:
    """config.toml with the model and the reward's folder pointed at the pre-training cache."""
    scorer = base / "scorer"
    return load_config(CONFIG, [
        f"model.path={base / 'janus'}", f"data.reward_setup.{REWARD}.model={scorer}",
        f"data.reward_setup.{REWARD}.processor={scorer}", *sets,
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = run_parser(__doc__, "runs/janus_t2i_base", "data vq cls scorer janus", "images")
    args = ap.parse_args(argv)
    t0, load0 = time.perf_counter(), os.getloadavg()
    base = Path(args.base)
    pre = pretrain(base, **parse_overrides(args.pretrain_set))
    t_pre = time.perf_counter() - t0
    cfg = build(base, args.set)
    model, adapter = build_model_and_adapter(cfg)
    train_prompts, held_prompts = prompt_split()
    assert not set(train_prompts) & set(held_prompts)
    trainer = Trainer(cfg, model, adapter, entries(train_prompts))
    start = copy.deepcopy(model).eval()  # the pre-trained model, for the KL and the grid

    def evaluate() -> tuple[dict[str, float], Tensor]:
        return measure(trainer, start, held_prompts, args.eval_samples, args.eval_seed,
                       pre["classifier"], pre["scorer"])  # fmt: skip

    before, img_before = evaluate()
    print(f"held-out before GRPO ({len(held_prompts)} prompts x {args.eval_samples}): "
          + _fmt(before))  # fmt: skip
    t1 = time.perf_counter()
    history = trainer.train()
    t_grpo = time.perf_counter() - t1
    after, img_after = evaluate()
    print("held-out after  GRPO: " + _fmt(after))
    gain = after[f"score/{REWARD}"] / before[f"score/{REWARD}"] - 1
    run_dir = Path(cfg.log.run_dir)
    grid = _write_grid(run_dir / "grid.png", img_before, img_after, args.eval_samples)
    load1 = os.getloadavg()
    result = {
        "reward": REWARD, "before": before, "after": after, "relative_gain": gain,
        "train_reward_first": history[0]["reward/mean"],
        "train_reward_last5": sum(h["reward/mean"] for h in history[-5:]) / len(history[-5:]),
        "kl_last_step": history[-1].get("kl", 0.0), "steps": len(history),
        "seconds": {"pretrain": t_pre, "grpo": t_grpo, "total": time.perf_counter() - t0},
        "loadavg_1min": {"start": load0[0], "end": load1[0]}, "grid": str(grid),
        "train_prompts": train_prompts, "heldout_prompts": held_prompts,
        "eval_seed": args.eval_seed, "seed": cfg.trainer.seed, "date": time.strftime("%Y-%m-%d"),
        "pretrain_meta": {k: v for k, v in pre["meta"].items() if k != "settings"},
    }  # fmt: skip
    (run_dir / "results.json").write_text(json.dumps(result, indent=2))
    s = result["seconds"]
    print(
        f"{REWARD} held-out {before[f'score/{REWARD}']:.3f} -> {after[f'score/{REWARD}']:.3f} "
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


def _fmt(m: dict[str, float]) -> str:
    return (
        f"{REWARD} {m[f'score/{REWARD}']:.3f}, aesthetic_proxy {m['score/aesthetic_proxy']:.3f}; "
        f"fidelity colour {m['fidelity/colour']:.3f} shape {m['fidelity/shape']:.3f} "
        f"both {m['fidelity/both']:.3f}"
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
