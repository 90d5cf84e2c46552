"""AR video example: GRPO teaches a tiny text-to-video AR model to move the object as prompted.

1. Pre-train (or reuse the cached) per-frame VQModel tokenizer and Llama prior over its codes on
   procedural clips whose captions are partly wrong (pretrain.py, clips.py): the prior knows
   every prompt but follows its direction word only weakly; and the judge (judge.py), a tiny 3D
   CNN that names a clip's direction, trained on VQ-decoded real clips.
2. Build a `VideoAdapter` (PerFrameVQ, text condition, CFG) and the unchanged `Trainer`
   through the Python API; rewards `motion` (direction from the prompt) + `temporal_consistency`.
3. Measure on held-out prompts (never drawn by GRPO), for every evaluation seed (sampling seeds
   that training never draws from, checked): motion-following by the judge (the independent
   figure) and by the reward's own estimator (`estimate_motion` -> `motion_label`), the reward,
   temporal consistency, colour fidelity, KL to the start model.
4. GRPO on the other prompts, once per training seed; measure again; print before -> after per
   run and mean ± spread over the grid; write results.json, and before/after GIFs and a
   frame-strip PNG of the first training seed at the first evaluation seed.

`python examples/video_motion/run.py [--seeds 0 1 2] [--eval-seeds 12345 23456 34567]
[--set key=value ...] [--pretrain-set stage.key=value ...]`
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
from ar_common.seeds import add_seed_options, check_eval_seeds, grid_cells, line, summarise  # noqa: E402
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
EVAL_SEEDS = (12345, 23456, 34567)  # the README's figures were measured at these


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
def measure(trainer: Trainer, ref: Any, judge: Any, held: list, samples: int,
            seed: int) -> tuple[dict, Tensor]:  # fmt: skip
    """Metrics over `samples` clips per prompt of `held`, sampled from one generator seeded with
    `seed` (before and after training the clips differ only by the model): the run's reward
    (total and parts), motion-following by the judge (`judge/...`) and by the reward's own
    estimator (`accuracy/motion...`), colour fidelity, KL(policy || start) per clip (sum over its
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
    want = [DIRECTIONS[parse_prompt(e.prompt)[2]] for e in ents]
    out.update(following("judge", judge.labels(x), want))
    out.update(following("accuracy", motion_label(estimate_motion(x)[0]), want))
    out["accuracy/colour"] = sum(
        c == parse_prompt(e.prompt)[0] for c, e in zip(colour_of(x), ents)
    ) / len(x)
    logp = adapter.token_logprobs(model, ro)[0]
    diff = ((logp - adapter.token_logprobs(ref, ro)[0]) * ro.completion_mask).sum(-1)
    out["kl_to_start/per_clip"] = float(diff.mean())
    out["kl_to_start/per_token"] = float(diff.mean() / ro.completion_mask.sum(-1).mean())
    return out, x


def following(name: str, labels: list[str], want: list[str]) -> dict[str, float]:
    """`name`/motion: the share of clips labelled with the prompted direction, per direction
    too; `name`/still: the share labelled "none"."""
    hits = [a == w for a, w in zip(labels, want)]
    out = {f"{name}/motion": sum(hits) / len(hits)}
    for d in DIRECTIONS:
        mine = [h for h, w in zip(hits, want) if w == d]
        out[f"{name}/motion/{d}"] = sum(mine) / max(len(mine), 1)
    out[f"{name}/still"] = labels.count("none") / len(labels)
    return out


def protocol(held: list, train: list, samples: int) -> dict[str, Any]:
    """What an evaluation measures, whatever its seed: the prompts and clips per prompt."""
    return {"heldout_prompts": [e.prompt for e in held], "train_prompts": [e.prompt for e in train],
            "clips_per_heldout_prompt": samples, "clips_per_train_prompt": max(samples // 4, 1)}  # fmt: skip


def evaluate(trainer: Trainer, start: Any, judge: Any, held: list, train: list, samples: int,
             seed: int) -> tuple[dict[str, float], Tensor]:  # fmt: skip
    """Held-out metrics, and the same on GRPO's own prompts (`train_prompts/...`, a quarter of
    the clips), at evaluation seed `seed`."""
    out, x = measure(trainer, start, judge, held, samples, seed)
    seen, _ = measure(trainer, start, judge, train, max(samples // 4, 1), seed)
    out.update({f"train_prompts/{k}": v for k, v in seen.items()})
    return out, x


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = run_parser(__doc__, "runs/video_motion_base", "data vq prior judge", "clips")
    add_seed_options(ap, evaluation=EVAL_SEEDS)  # --eval-seed N: the same as --eval-seeds N
    ap.add_argument("--consistency-weight", type=float, default=1.0,
                    help="weight of temporal_consistency beside motion (weight 1)")  # fmt: skip
    args = ap.parse_args(argv)
    t0, load0 = time.perf_counter(), os.getloadavg()
    cfg = load_config(CONFIG, args.set)
    check_eval_seeds(args.eval_seeds, args.seeds, cfg.trainer.steps,
                     cfg.algorithm.dynamic_sampling_max_rounds)  # fmt: skip
    pre = pretrain(args.base, threads=cfg.trainer.threads, **parse_overrides(args.pretrain_set))
    t_pre = time.perf_counter() - t0
    train_prompts, held_prompts = prompt_split()
    held = entries(held_prompts, args.consistency_weight)
    train = entries(train_prompts, args.consistency_weight)
    run_dir = Path(cfg.log.run_dir)
    grid = Grid(pre, held, train, args.eval_samples, args.eval_seeds)
    proto = {**protocol(held, train, args.eval_samples), "train_seeds": args.seeds,
             "eval_seeds": args.eval_seeds, "judge": pre["meta"].get("judge", {})}  # fmt: skip
    runs: list[dict[str, Any]] = []
    for t in args.seeds:  # results.json after every run: a long grid keeps what it finished
        runs.append(grid.run(args.set, t, run_dir, pictures=t == args.seeds[0]))
        result = {
            "protocol": {**proto, "train_seeds_done": [r["seed"] for r in runs]},
            "summary": summarise(grid_cells(grid.before, grid.after)), "before": grid.before,
            "after": grid.after, "runs": runs,
            "seconds": {"pretrain": t_pre, "total": time.perf_counter() - t0},
            "loadavg_1min": {"start": load0[0], "end": os.getloadavg()[0]}, **grid.pictures,
            "date": time.strftime("%Y-%m-%d"),
        }  # fmt: skip
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "results.json").write_text(json.dumps(result, indent=2))
        _print_summary(result)
    return result


class Grid:
    """GRPO runs (one per training seed) from the same pre-trained prior, each measured at every
    evaluation seed; the start model is measured once per evaluation seed."""

    def __init__(self, pre: dict[str, Any], held: list, train: list, samples: int,
                 eval_seeds: list[int]) -> None:  # fmt: skip
        self.pre, self.held, self.train = pre, held, train
        self.n, self.eval_seeds = samples, eval_seeds
        self.start = copy.deepcopy(pre["prior"]).eval()  # the pre-trained model, for the KL
        self.before: dict[int, dict[str, float]] = {}
        self.after: dict[int, dict[int, dict[str, float]]] = {}
        self.x_before: dict[int, Tensor] = {}
        self.pictures: dict[str, Any] = {}

    def evaluate(self, trainer: Trainer, seed: int) -> tuple[dict[str, float], Tensor]:
        return evaluate(trainer, self.start, self.pre["judge"], self.held, self.train, self.n, seed)

    def run(self, overrides: list[str], seed: int, run_dir: Path, pictures: bool) -> dict[str, Any]:
        """GRPO with trainer.seed = `seed` (its files under run_dir/seed<seed>/), measured at
        every evaluation seed before (once) and after."""
        sets = [*overrides, f"trainer.seed={seed}", f"log.run_dir={run_dir / f'seed{seed}'}"]
        cfg = load_config(CONFIG, sets)
        adapter = build_adapter(self.pre, cfg.sampling)
        trainer = Trainer(cfg, copy.deepcopy(self.pre["prior"]), adapter, self.train)
        for e in self.eval_seeds:  # the start model is the same for every training seed
            if e not in self.before:
                self.before[e], self.x_before[e] = self.evaluate(trainer, e)
                print(f"held-out before GRPO, eval seed {e} ({len(self.held)} prompts x {self.n}): "
                      f"{_fmt(self.before[e])}", flush=True)  # fmt: skip
        t1 = time.perf_counter()
        history = trainer.train()
        t_grpo = time.perf_counter() - t1
        self.after[seed] = {}
        for e in self.eval_seeds:
            self.after[seed][e], x = self.evaluate(trainer, e)
            print(f"held-out after GRPO, trainer.seed {seed}, eval seed {e}: "
                  f"{_fmt(self.after[seed][e])}", flush=True)  # fmt: skip
            if pictures and e == self.eval_seeds[0]:
                self.pictures = _pictures(run_dir, self.x_before[e], x, len(self.held), self.n)
        last = history[-min(5, len(history)) :]
        out = {"seed": seed, "steps": len(history), "grpo_seconds": t_grpo,
               "train_reward_first": history[0]["reward/mean"],
               "train_reward_last5": sum(h["reward/mean"] for h in last) / len(last),
               "kl_k3_last_step": history[-1].get("kl", 0.0), "load_end": os.getloadavg()[0]}  # fmt: skip
        print(f"GRPO trainer.seed {seed}: {len(history)} steps in {t_grpo:.0f}s, train reward "
              f"{out['train_reward_first']:.3f} -> {out['train_reward_last5']:.3f} (last 5), "
              f"load {out['load_end']:.1f}", flush=True)  # fmt: skip
        return out


SHOWN = {"judge/motion": "motion-following, judge", "accuracy/motion": "motion-following, reward's estimator",
         "judge/still": "still (judge)", "reward": "reward", "reward/motion": "reward: motion",
         "reward/temporal_consistency": "temporal consistency", "accuracy/colour": "colour fidelity",
         "kl_to_start/per_clip": "KL to start, nats/clip",
         "train_prompts/judge/motion": "GRPO's own prompts: motion-following, judge"}  # fmt: skip


def _print_summary(result: dict[str, Any]) -> None:
    p, s = result["protocol"], result["seconds"]
    print(f"held-out: {len(p['heldout_prompts'])} prompts x {p['clips_per_heldout_prompt']} clips; "
          f"training seeds {p['train_seeds_done']} x eval seeds {p['eval_seeds']}; mean ± sd over "
          "training seeds (each the mean over eval seeds); before: over eval seeds")  # fmt: skip
    for key, name in SHOWN.items():
        print(line(name, result["summary"][key], 2 if key.startswith("kl") else 3))
    acc = p["judge"].get("accuracy", {})
    if acc:
        print(
            f"judge on fresh decoded real clips: {acc['all/vq']}, held-out prompts {acc['heldout/vq']}"
        )
    print(f"total {s['total']:.0f}s (pre-training {s['pretrain']:.0f}s); load average "
          f"{result['loadavg_1min']['start']:.1f} -> {result['loadavg_1min']['end']:.1f}; "
          f"clips and frame strips: {result['strip']}")  # fmt: skip


def _pictures(run_dir: Path, x_before: Tensor, x_after: Tensor, prompts: int, n: int) -> dict:
    """GIFs (2 per held-out prompt, before_*/after_*) and the frame-strip PNG."""
    pick = [p * n + j for p in range(prompts) for j in range(min(2, n))]
    gifs = save_clips(list(x_before[pick]), run_dir / "clips", "before", scale=4)
    gifs += save_clips(list(x_after[pick]), run_dir / "clips", "after", scale=4)
    strip = _write_strips(run_dir / "before_after.png", x_before[pick], x_after[pick])
    return {"strip": str(strip), "gifs": [str(g) for g in gifs]}


def _fmt(m: dict[str, float]) -> str:
    return (
        f"judge {m['judge/motion']:.3f} (still {m['judge/still']:.3f}); estimator "
        f"{m['accuracy/motion']:.3f}; reward {m['reward']:.3f} (motion {m['reward/motion']:.3f}, "
        f"temporal_consistency {m['reward/temporal_consistency']:.3f}); colour "
        f"{m['accuracy/colour']:.3f}; KL {m['kl_to_start/per_clip']:.2f} nats/clip"
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
