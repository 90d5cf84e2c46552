"""Run folders for the tracker and report tests: a tiny text run with two rewards and a KL, and
image/video run folders as those adapters write them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from grpo_ar.adapters.text import TextAdapter
from grpo_ar.adapters.video import save_clips
from grpo_ar.config import load_config
from grpo_ar.io.data import load_rows
from grpo_ar.rewards import REWARDS, per_sample, register_reward
from grpo_ar.train.trainer import Trainer
from tiny import char_tokenizer, tiny_llama

if "trk_sevens" not in REWARDS:

    @register_reward("trk_sevens")
    @per_sample
    def trk_sevens(output: str) -> float:
        return output.count("7") / 4

    @register_reward("trk_short")
    @per_sample
    def trk_short(output: str) -> float:
        return 1.0 - len(output) / 4


def make(run_dir: Path, overrides=(), parallel=None) -> Trainer:
    tok = char_tokenizer()
    cfg = load_config(
        None,
        [
            "sampling.max_new_tokens=4",
            "trainer.steps=3",
            "trainer.batch_size=4",
            "trainer.lr=1e-2",
            "algorithm.group_size=2",
            "algorithm.beta=0.05",  # a KL to log
            "log.samples_per_step=2",
            "log.progress=false",
            f"log.run_dir={run_dir}",
            *overrides,
        ],
    )
    rows = [{"prompt": f"{i}+{i}=", "rewards": ["trk_sevens", "trk_short"]} for i in range(6)]
    entries = load_rows(rows)
    model = tiny_llama(vocab_size=len(tok), seed=0)
    return Trainer(
        cfg, model, TextAdapter(tok, cfg.sampling), entries, entries[:2], parallel=parallel
    )


def write_media_run(root: Path, kind: str, steps: int = 5) -> Path:
    """A run folder as an image (kind="png") or video (kind="gif") run writes it: metrics and
    samples.jsonl, sample files from the video adapter's own writer or PIL."""
    from PIL import Image

    run = root / kind
    run.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    metrics, samples = [], []
    for step in range(1, steps + 1):
        metrics.append({"step": step, "reward/mean": step / steps, "kl": 0.01 * step,
                        "entropy": 2.0 - 0.1 * step, "time/step": 0.5, "tokens_per_s": 100.0})  # fmt: skip
        folder = run / "samples" / f"step_{step:06d}"
        if kind == "gif":  # (F, H, W, 3) uint8 clips
            clips = [torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8, generator=g)] * 2
            paths = save_clips(clips, folder)
        else:
            folder.mkdir(parents=True)
            paths = []
            for i in range(2):
                px = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8, generator=g).numpy()
                paths.append(folder / f"sample_{i:03d}.png")
                Image.fromarray(px).save(paths[-1])
        for p in paths:
            out = str(p.relative_to(run))
            samples.append({"step": step, "prompt": 1, "output": out, "reward": step / steps,
                            "rewards": {"aesthetic": step / steps}, "advantage": 0.0})  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (run / "config.yaml").write_text("trainer:\n  steps: 5  # <resolved>\n")
    return run
