"""GRPO on the audio-tone modality (tones.py), with the unchanged trainer.

    python examples/audio_tones/run.py [--grpo-steps 40] [--seed 0]

1. A tiny Llama is supervised for a few seconds on clean tones whose pitch is, half of the time,
   two bins off the prompted one: it makes tones, but often the wrong ones.
2. GRPO with the `tone_pitch` reward; held-out pitch reward (greedy and sampled) before / after.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tones import BOS, PITCH0, PITCHES, VOCAB, ToneAdapter, sine_codes, tone_rows  # noqa: E402

from grpo_ar import Trainer, load_config, load_rows  # noqa: E402


def tiny_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=BOS, eos_token_id=BOS)  # fmt: skip
    return LlamaForCausalLM(cfg)


def warm_up(model, steps: int, seed: int, wrong: float = 0.5) -> None:
    """Teacher forcing on tones, `wrong` of them two bins off the prompted pitch."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        pitch = rng.integers(0, len(PITCHES), 32)
        said = np.where(rng.random(32) < wrong, (pitch + 2) % len(PITCHES), pitch)
        codes = [sine_codes(int(p), rng.uniform(0, 2 * np.pi)) for p in said]
        ids = torch.tensor([[BOS, PITCH0 + int(p), *c] for p, c in zip(pitch, codes)])
        labels = ids.clone()
        labels[:, :2] = -100
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser()
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--grpo-steps", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model = tiny_model(args.seed)
    warm_up(model, args.warmup_steps, args.seed)
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="audio_tones_")
    cfg = load_config(None, [f"trainer.steps={args.grpo_steps}", "trainer.batch_size=8",
                             "trainer.lr=2e-4", "algorithm.group_size=8", "algorithm.beta=0.01",
                             f"trainer.seed={args.seed}", f"log.run_dir={run_dir}",
                             "log.progress=false", "data.eval_batch_size=64",
                             "log.overwrite=true"])  # fmt: skip
    train, held_out = (
        load_rows(tone_rows(256, args.seed)),
        load_rows(tone_rows(64, 10**6 + args.seed)),
    )
    trainer = Trainer(cfg, model, ToneAdapter(cfg.sampling), train, held_out)
    before = {**trainer.evaluate(held_out), **trainer.evaluate(held_out, greedy=False, samples=4)}
    trainer.train()
    after = {**trainer.evaluate(held_out), **trainer.evaluate(held_out, greedy=False, samples=4)}
    out = {f"{k}/before": v for k, v in before.items()} | {
        f"{k}/after": v for k, v in after.items()
    }
    for mode in ("greedy", "sampled"):
        k = f"eval/{mode}/reward"
        print(f"held-out {mode} pitch reward: {before[k]:.3f} -> {after[k]:.3f}")
    print(f"total {time.perf_counter() - start:.0f} s, run directory {run_dir}")
    return out


if __name__ == "__main__":
    main()
