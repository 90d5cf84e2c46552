"""AR video example: GRPO teaches a tiny text-to-video AR model to move the object as prompted.

1. Pre-train (or reuse the cached) per-frame VQModel tokenizer and Llama prior over its codes on
   procedural clips whose captions are partly wrong (pretrain.py, clips.py): the prior knows
   every prompt but follows its direction word only weakly.
2. Build a `VideoAdapter` (PerFrameVQ, text condition, CFG) and the unchanged `Trainer`
   through the Python API; rewards `motion` (direction from the prompt) + `temporal_consistency`.
3. Measure on held-out prompts (never trained on by GRPO) with fixed sampling seeds: reward,
   motion-following accuracy (`estimate_motion` -> `motion_label` vs the prompted direction),
   temporal consistency, colour fidelity, KL to the start model.
4. GRPO on the other prompts; measure again; print before -> after; write before/after GIFs and
   one frame-strip PNG of the same held-out prompts and sampling seeds.

`python examples/video_motion/run.py [--set key=value ...] [--pretrain-set stage.key=value ...]`
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as video_motion.*: no clash
# with other examples' modules of the same name (pretrain.py) in one process

from ar_common.pretraining import CODE_OFFSET  # noqa: E402
from ar_common.runs import parse_overrides, run_parser  # noqa: E402
from video_motion.clips import CLIP, DIRECTIONS, RGB, parse_prompt, prompt_split  # noqa: E402
from video_motion.pretrain import pretrain  # noqa: E402

from grpo_ar.adapters.image import TextCondition  # noqa: E402
from grpo_ar.adapters.video import VideoAdapter, frame_strip, save_clips, video_grid  # noqa: E402
from grpo_ar.adapters.vq import DiffusersVQ, PerFrameVQ  # noqa: E402
from grpo_ar.config import load_config  # noqa: E402
from grpo_ar.io.data import load_rows  # noqa: E402
from grpo_ar.rewards import RewardContext  # noqa: E402
from grpo_ar.rewards.video import estimate_motion, motion_label  # noqa: E402
from grpo_ar.train.trainer import Trainer  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "config.toml"


def entries(prompts: list[str], consistency_weight: float) -> list:
    """One entry per prompt: `motion` towards the prompted direction at the data's speed (in
    frame sizes per frame: a clip that teleports or stands still scores low) +
    `temporal_consistency`."""
    speed = CLIP["speed"] / CLIP["size"]
    rows = [
        {
            "prompt": p,
            "rewards": [
                {"name": "motion", "args": {"direction": p.split()[-1], "speed": speed}},
                {"name": "temporal_consistency", "weight": consistency_weight},
            ],
        }
        for p in prompts
    ]
    return load_rows(rows)


def build_adapter(pre: dict[str, Any], sampling: Any) -> VideoAdapter:
    """Per-frame VQ decoder, "<bos> colour shape moves direction" text prompts, CFG-masked null."""
    decoder = PerFrameVQ(DiffusersVQ(pre["vq"]))
    grid = video_grid(decoder, int(CLIP["frames"]), int(CLIP["size"]), int(CLIP["size"]))
    cond = TextCondition(pre["tokenizer"], uncond="masked")
    return VideoAdapter(decoder, sampling, grid, CODE_OFFSET, cond, output="float")


def colour_of(x: Tensor, threshold: float = 0.45) -> list[int]:
    """(N, F, 3, H, W) clips -> index of the COLOURS entry nearest to each clip's mean
    foreground colour (pixels whose brightest channel exceeds `threshold`: every colour has one
    >= 0.85, the background none above 0.2), -1 when there is no foreground."""
    fg = (x.amax(2, keepdim=True) > threshold).float()  # (N, F, 1, H, W)
    mass = fg.sum((1, 2, 3, 4))
    mean = (x * fg).sum((1, 3, 4)) / mass.clamp_min(1)[:, None]  # (N, 3)
    best = torch.cdist(mean, torch.tensor(RGB)).argmin(-1)
    return torch.where(mass > 0, best, -1).tolist()


@torch.no_grad()
def measure(trainer: Trainer, ref: Any, held: list, samples: int, seed: int) -> tuple[dict, Tensor]:
    """Held-out metrics over `samples` clips per prompt, sampled with a fixed seed (before and
    after training the clips differ only by the model): the run's reward (total and parts),
    motion-following accuracy, colour fidelity, KL(policy || start) per clip (sum over its
    tokens, Monte Carlo over the policy's samples)."""
    model, adapter = trainer.model, trainer.adapter
    model.eval()
    gen = torch.Generator(device=trainer.device).manual_seed(seed)
    ro = adapter.sample(model, adapter.encode(held).to(trainer.device), samples, generator=gen)
    clips = adapter.decode(ro)
    x = torch.stack(clips).cpu()  # (P·G, F, 3, H, W), prompt-major
    ents = [e for e in held for _ in range(samples)]
    ctx = RewardContext(ents, ro.group_ids.tolist(), samples, trainer.step)
    res = trainer.rewards(clips, ctx)
    out = {"reward": float(res.total.mean())}
    out.update({f"reward/{n}": float(res.components[:, k].mean()) for k, n in enumerate(res.names)})
    want = [parse_prompt(e.prompt) for e in ents]
    labels = motion_label(estimate_motion(x)[0])
    hits = [lab == DIRECTIONS[w[2]] for lab, w in zip(labels, want)]
    out["accuracy/motion"] = sum(hits) / len(x)
    for d, name in enumerate(DIRECTIONS):  # per prompted direction
        mine = [h for h, w in zip(hits, want) if w[2] == d]
        out[f"accuracy/motion/{name}"] = sum(mine) / max(len(mine), 1)
    out["accuracy/still"] = labels.count("none") / len(x)
    out["accuracy/colour"] = sum(c == w[0] for c, w in zip(colour_of(x), want)) / len(x)
    logp = adapter.token_logprobs(model, ro)[0]
    diff = ((logp - adapter.token_logprobs(ref, ro)[0]) * ro.completion_mask).sum(-1)
    out["kl_to_start/per_clip"] = float(diff.mean())
    out["kl_to_start/per_token"] = float(diff.mean() / ro.completion_mask.sum(-1).mean())
    return out, x


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = run_parser(__doc__, "runs/video_motion_base", "data vq prior", "clips")
    ap.add_argument(
        "--consistency-weight",
        type=float,
        default=1.0,
        help="weight of temporal_consistency beside motion (weight 1)",
    )
    args = ap.parse_args(argv)
    t0, load0 = time.perf_counter(), os.getloadavg()
    cfg = load_config(CONFIG, args.set)
    pre = pretrain(args.base, threads=cfg.trainer.threads, **parse_overrides(args.pretrain_set))
    t_pre = time.perf_counter() - t0

    model = pre["prior"]
    adapter = build_adapter(pre, cfg.sampling)
    train_prompts, held_prompts = prompt_split()
    held = entries(held_prompts, args.consistency_weight)
    train = entries(train_prompts, args.consistency_weight)
    trainer = Trainer(cfg, model, adapter, train)
    start = copy.deepcopy(model).eval()  # the pre-trained model, for the KL

    def evaluate() -> tuple[dict[str, float], Tensor]:
        out, x = measure(trainer, start, held, args.eval_samples, args.eval_seed)
        seen, _ = measure(trainer, start, train, max(args.eval_samples // 4, 1), args.eval_seed)
        out.update({f"train_prompts/{k}": v for k, v in seen.items()})
        return out, x

    before, x_before = evaluate()
    print(f"held-out before GRPO ({len(held)} prompts x {args.eval_samples}): {_fmt(before)}")
    t1 = time.perf_counter()
    history = trainer.train()
    t_grpo = time.perf_counter() - t1
    after, x_after = evaluate()
    print(f"held-out after  GRPO: {_fmt(after)}")
    print(
        f"GRPO's own training prompts ({len(train)} x {max(args.eval_samples // 4, 1)}): "
        f"accuracy {before['train_prompts/accuracy/motion']:.3f} -> "
        f"{after['train_prompts/accuracy/motion']:.3f}, reward "
        f"{before['train_prompts/reward']:.3f} -> {after['train_prompts/reward']:.3f}"
    )
    run_dir = Path(cfg.log.run_dir)
    pick = [p * args.eval_samples + j for p in range(len(held)) for j in range(min(2, args.eval_samples))]  # fmt: skip
    gifs = save_clips(list(x_before[pick]), run_dir / "clips", "before", scale=4)
    gifs += save_clips(list(x_after[pick]), run_dir / "clips", "after", scale=4)
    strip = _write_strips(run_dir / "before_after.png", x_before[pick], x_after[pick])
    load1 = os.getloadavg()
    last = history[-min(5, len(history)) :]
    result = {
        "before": before, "after": after,
        "train_reward_first": history[0]["reward/mean"],
        "train_reward_last5": sum(h["reward/mean"] for h in last) / len(last),
        "kl_k3_last_step": history[-1].get("kl", 0.0), "steps": len(history),
        "seconds": {"pretrain": t_pre, "grpo": t_grpo, "total": time.perf_counter() - t0},
        "loadavg_1min": {"start": load0[0], "end": load1[0]}, "strip": str(strip),
        "gifs": [str(p) for p in gifs], "heldout_prompts": held_prompts,
        "date": time.strftime("%Y-%m-%d"), "seed": cfg.trainer.seed,
    }  # fmt: skip
    (run_dir / "results.json").write_text(json.dumps(result, indent=2))
    s = result["seconds"]
    print(
        f"motion-following accuracy (held-out) {before['accuracy/motion']:.3f} -> "
        f"{after['accuracy/motion']:.3f} ({after['accuracy/motion'] - before['accuracy/motion']:+.3f}); "
        f"reward {before['reward']:.3f} -> {after['reward']:.3f}; temporal consistency "
        f"{before['reward/temporal_consistency']:.3f} -> {after['reward/temporal_consistency']:.3f}; "
        f"colour fidelity {before['accuracy/colour']:.3f} -> {after['accuracy/colour']:.3f}; "
        f"KL to the start model {after['kl_to_start/per_clip']:.2f} nats/clip "
        f"({after['kl_to_start/per_token']:.4f}/token)\n"
        f"GRPO: {len(history)} steps in {s['grpo']:.0f}s, train reward "
        f"{result['train_reward_first']:.3f} -> {result['train_reward_last5']:.3f} (last 5), k3 KL "
        f"of the last step {result['kl_k3_last_step']:.4f}; pre-training {s['pretrain']:.0f}s; "
        f"total {s['total']:.0f}s; load average {load0[0]:.1f} -> {load1[0]:.1f}\n"
        f"clips (before_*/after_*, 2 per held-out prompt: {', '.join(held_prompts)}): "
        f"{run_dir / 'clips'}; frame strips: {strip}"
    )
    return result


def _fmt(m: dict[str, float]) -> str:
    return (
        f"reward {m['reward']:.3f} (motion {m['reward/motion']:.3f}, temporal_consistency "
        f"{m['reward/temporal_consistency']:.3f}); motion-following accuracy "
        f"{m['accuracy/motion']:.3f} (still {m['accuracy/still']:.3f}); colour fidelity "
        f"{m['accuracy/colour']:.3f}; KL to start {m['kl_to_start/per_clip']:.2f} nats/clip"
    )


def _write_strips(path: Path, before: Tensor, after: Tensor, scale: int = 4) -> Path:
    """One PNG: for each picked clip a row of its frames before GRPO and under it the same
    prompt and sampling seed after (a grey line between them, white between pairs)."""
    from PIL import Image

    rows = []
    for b, a in zip(before, after):
        sb, sa = frame_strip(b), frame_strip(a)
        grey, white = (
            torch.full((n, sb.shape[1], 3), v, dtype=torch.uint8) for n, v in ((1, 128), (3, 255))
        )
        rows += [sb, grey, sa, white]
    im = Image.fromarray(torch.cat(rows[:-1]).numpy())
    path.parent.mkdir(parents=True, exist_ok=True)
    im.resize((im.width * scale, im.height * scale), Image.NEAREST).save(path)
    return path


if __name__ == "__main__":
    main()
