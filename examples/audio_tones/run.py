"""GRPO on the audio-tone modality (tones.py), with the unchanged trainer.

    python examples/audio_tones/run.py [--seeds 0 1 2] [--eval-seeds 12345 23456 34567]
                                       [--grpo-steps N] [--set key=value ...]

1. A tiny Llama is supervised for a few seconds on clean tones whose pitch is, half of the time,
   two bins off the prompted one: it makes tones, but often the wrong ones.
2. GRPO with the `tone_pitch` reward on 6 of the 8 pitches, once per training seed; the other
   2 pitches (HELDOUT_PITCHES) are never drawn by GRPO.
3. Pitch reward on the held-out pitches (greedy, and sampled at every evaluation seed: sampling
   seeds that training never draws from, checked), before and after; the same on GRPO's own
   pitches; and why the sampled reward moves or not: the within-group reward spread, the share
   of groups with no spread (zero advantage), the per-token entropy, and where the FFT peak of
   the sampled tones lies (the prompted bin, the warm-up's wrong bin, elsewhere).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # ar_common
from ar_common.seeds import add_seed_options, check_eval_seeds, grid_cells, line, summarise  # noqa: E402
from tones import BOS, PITCH0, PITCHES, VOCAB, ToneAdapter, sine_codes, tone_rows  # noqa: E402

from grpo_ar import Trainer, load_config, load_rows  # noqa: E402
from grpo_ar.train.evaluation import (  # noqa: E402
    eval_generator_seeds,
    evaluate_rewards,
    reward_context,
)

HELDOUT_PITCHES = (1, 6)
"""Pitch indices GRPO never draws (the warm-up sees all 8): 6's wrong warm-up pitch is 6 bins
away (reward 0), 1's is 2 bins away (reward 0.5), as for the trained pitches 7 and 0, 2..5."""
TRAIN_PITCHES = tuple(p for p in range(len(PITCHES)) if p not in HELDOUT_PITCHES)
DEFAULTS = ["trainer.batch_size=8", "trainer.lr=2e-4", "algorithm.group_size=8",
            "algorithm.beta=0.01", "log.progress=false", "log.overwrite=true"]  # fmt: skip
EVAL_BATCH = 16  # prompts per evaluation batch (its generator: eval seed + 7919 + offset)
EVAL_SEEDS = (12345, 23456, 34567)  # the README's figures were measured at these


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


def eval_draws(seed: int, n_entries: int) -> list[int]:
    """The generator seeds an evaluation at `seed` draws from over `n_entries`: the
    batches of `evaluate_rewards`, and `diagnose`'s one generator (the seed itself)."""
    return [*eval_generator_seeds(seed, n_entries, EVAL_BATCH), seed]


@torch.no_grad()
def diagnose(model, adapter, rewards, entries: list, group: int, seed: int) -> dict[str, float]:
    """Why GRPO's signal is what it is, on `group` samples of each entry (one generator):
    within-group reward sd, share of groups with no spread (their advantages are all 0),
    per-token entropy estimate (-mean sampled log-prob), and where the sampled tones' FFT peak
    lies: the prompted bin, the warm-up's wrong bin (two pitches up), elsewhere."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    ro = adapter.sample(model, adapter.encode(entries), group, generator=gen)
    waves = adapter.decode(ro)
    r = rewards(waves, reward_context(adapter, ro, group, 0)).total.view(-1, group)
    spec = np.abs(np.fft.rfft(np.stack([w - w.mean() for w in waves]), axis=-1))
    peak = spec[:, 1:].argmax(-1) + 1
    pitch = np.repeat([e.prompt for e in entries], group)
    right = peak == np.asarray(PITCHES)[pitch]
    shifted = peak == np.asarray(PITCHES)[(pitch + 2) % len(PITCHES)]
    return {
        "group_reward_sd": float(r.std(1, correction=0).mean()),
        "zero_spread_groups": float((r.std(1, correction=0) == 0).float().mean()),
        "token_entropy": float(
            -(ro.sampling_logp * ro.completion_mask).sum() / ro.completion_mask.sum()
        ),
        "peak/prompted": float(right.mean()),
        "peak/warmup_wrong": float(shifted.mean()),
        "peak/elsewhere": float(1 - right.mean() - shifted.mean()),
    }


def evaluate(
    trainer: Trainer, held: list, train: list, samples: int, seed: int
) -> dict[str, float]:
    """Greedy and sampled (`samples` per prompt, eval seed `seed`) pitch reward on the held-out
    and on as many rows of GRPO's own pitches (`train_prompts/...`), and `diagnose` on GRPO's
    pitches."""
    m, ad, rw = trainer.model, trainer.adapter, trainer.rewards
    out: dict[str, float] = {}
    for prefix, ents in (("", held), ("train_prompts/", train[: len(held)])):
        for greedy, k in ((True, 1), (False, samples)):
            got = evaluate_rewards(m, ad, rw, ents, greedy=greedy, samples=k,
                                   batch_size=EVAL_BATCH, seed=seed)  # fmt: skip
            out.update({f"{prefix}{key}": v for key, v in got.items()})
    out.update({f"diag/{k}": v for k, v in diagnose(m, ad, rw, train[:32], 8, seed).items()})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--warmup-seed", type=int, default=0, help="model init and warm-up data")
    p.add_argument("--grpo-steps", type=int, default=60)
    p.add_argument("--eval-samples", type=int, default=4, help="sampled tones per prompt")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override after the example's defaults (e.g. trainer.lr=1e-3)")  # fmt: skip
    add_seed_options(p, evaluation=EVAL_SEEDS)
    args = p.parse_args(argv)
    start = time.perf_counter()
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="audio_tones_"))
    held = load_rows(tone_rows(64, 10**6, HELDOUT_PITCHES))
    train = load_rows(tone_rows(256, 0, TRAIN_PITCHES))
    rounds = load_config(None, [*DEFAULTS, *args.set]).algorithm.dynamic_sampling_max_rounds
    check_eval_seeds(args.eval_seeds, args.seeds, args.grpo_steps, rounds,
                     draws=lambda e: eval_draws(e, len(held)))  # fmt: skip
    model = tiny_model(args.warmup_seed)
    warm_up(model, args.warmup_steps, args.warmup_seed)
    before: dict[int, dict[str, float]] = {}
    after: dict[int, dict[int, dict[str, float]]] = {}
    runs = []
    for t in args.seeds:
        sets = [*DEFAULTS, f"trainer.steps={args.grpo_steps}", f"trainer.seed={t}",
                f"log.run_dir={run_dir / f'seed{t}'}", *args.set]  # fmt: skip
        cfg = load_config(None, sets)
        trainer = Trainer(cfg, copy.deepcopy(model), ToneAdapter(cfg.sampling), train)
        for e in args.eval_seeds:  # the warmed-up model is the same for every training seed
            if e not in before:
                before[e] = evaluate(trainer, held, train, args.eval_samples, e)
                print(f"before GRPO, eval seed {e}: {_fmt(before[e])}", flush=True)
        t1 = time.perf_counter()
        history = trainer.train()
        runs.append(_run_stats(t, history, time.perf_counter() - t1))
        after[t] = {
            e: evaluate(trainer, held, train, args.eval_samples, e) for e in args.eval_seeds
        }
        for e in args.eval_seeds:
            print(f"after GRPO, trainer.seed {t}, eval seed {e}: {_fmt(after[t][e])}", flush=True)
    result = {
        "protocol": {"heldout_pitches": list(HELDOUT_PITCHES), "train_pitches": list(TRAIN_PITCHES),
                     "heldout_prompts": len(held), "sampled_per_prompt": args.eval_samples,
                     "train_seeds": args.seeds, "eval_seeds": args.eval_seeds,
                     "config": [*DEFAULTS, f"trainer.steps={args.grpo_steps}", *args.set]},
        "summary": summarise(grid_cells(before, after)), "before": before, "after": after, "runs": runs,
        "seconds": time.perf_counter() - start, "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(result, indent=2))
    for key in SHOWN:
        print(line(key, result["summary"][key]))
    print(f"total {result['seconds']:.0f} s, run directory {run_dir}")
    return result


SHOWN = ("eval/sampled/reward", "eval/greedy/reward", "train_prompts/eval/sampled/reward",
         "train_prompts/eval/greedy/reward", "diag/group_reward_sd", "diag/zero_spread_groups",
         "diag/token_entropy", "diag/peak/prompted", "diag/peak/warmup_wrong",
         "diag/peak/elsewhere")  # fmt: skip


def _run_stats(seed: int, history: list[dict[str, float]], seconds: float) -> dict[str, Any]:
    """Per GRPO run: the training reward first / last 5 steps, and over all steps the mean
    share of zero-spread groups and the batch reward sd."""
    last = history[-min(5, len(history)) :]
    mean = lambda k, rows: sum(h.get(k, 0.0) for h in rows) / len(rows)  # noqa: E731
    return {"seed": seed, "steps": len(history), "grpo_seconds": seconds,
            "train_reward_first": history[0]["reward/mean"],
            "train_reward_last5": mean("reward/mean", last),
            "zero_std_groups_mean": mean("reward/zero_std_groups", history),
            "reward_std_mean": mean("reward/std", history)}  # fmt: skip


def _fmt(m: dict[str, float]) -> str:
    return (
        f"held-out sampled {m['eval/sampled/reward']:.3f} greedy {m['eval/greedy/reward']:.3f}; "
        f"GRPO's pitches sampled {m['train_prompts/eval/sampled/reward']:.3f} greedy "
        f"{m['train_prompts/eval/greedy/reward']:.3f}; group sd {m['diag/group_reward_sd']:.3f}, "
        f"zero-spread groups {m['diag/zero_spread_groups']:.2f}, entropy "
        f"{m['diag/token_entropy']:.2f} nats/token, peak at prompted/wrong/else "
        f"{m['diag/peak/prompted']:.2f}/{m['diag/peak/warmup_wrong']:.2f}/"
        f"{m['diag/peak/elsewhere']:.2f}"
    )


if __name__ == "__main__":
    main()
