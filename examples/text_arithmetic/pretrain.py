"""Brief supervised pre-training of the tiny arithmetic Llama: the weak starting point for GRPO.

The supervised answers are deliberately noisy: a fraction `mistake_frac` of them is written with
its digits reversed (a systematic, plausible mistake). The model learns to add *and* learns the
mistake, so it starts weak (greedy mostly picks the mistake) while the right answer is in its
distribution: what RL with a verifiable reward is for. The reward never sees the mistake rule.

    python examples/text_arithmetic/pretrain.py --out runs/arith_base

Trains on `prompt + answer + <eos>` (loss on answer and <eos> only), saves model + tokenizer +
meta.json to `--out`, and reuses that folder when it already holds a run with the same settings.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from task import accuracy, build_model, build_tokenizer, make_problems  # noqa: E402

TASK = {"n_terms": 2, "max_operand": 49, "ops": "+"}
MODEL = {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 512}


def sft_batch(
    rows: list[dict[str, str]], tokenizer: PreTrainedTokenizerFast
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (ids, attention mask, labels), labels -100 except on answer + <eos>.

    Right padding keeps positions 0..T-1 on real tokens, which is what `generate` gives a
    left-padded prompt (it derives position ids from the attention mask).
    """
    seqs, labels = [], []
    for r in rows:
        p = tokenizer(r["prompt"])["input_ids"]
        a = tokenizer(r["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])  # (B, T)
    lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels])  # (B, T)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])  # (B, T)
    return ids, mask, lab


def with_mistakes(rows: list[dict[str, str]], frac: float, seed: int) -> list[dict[str, str]]:
    """A seeded `frac` of the rows get their answer's digits reversed ("81" -> "18")."""
    rng = random.Random(seed)
    return [{**r, "answer": r["answer"][::-1]} if rng.random() < frac else r for r in rows]


def pretrain(
    out_dir: str | Path,
    steps: int = 800,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup: int = 20,
    final_lr_frac: float = 0.1,
    weight_decay: float = 0.01,
    label_smoothing: float = 0.0,
    mistake_frac: float = 0.6,
    task: dict[str, Any] | None = None,
    model_size: dict[str, Any] | None = None,
    eval_n: int = 200,
    threads: int = 1,
    verbose: bool = True,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """SFT a fresh tiny Llama for `steps` AdamW steps (fp32); cached in `out_dir` by settings."""
    task = {**TASK, **(task or {})}
    model_size = {**MODEL, **(model_size or {})}
    # Everything that determines the weights: the cache key stored in meta.json.
    settings = {
        "steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "warmup": warmup,
        "final_lr_frac": final_lr_frac,
        "weight_decay": weight_decay, "label_smoothing": label_smoothing, "mistake_frac": mistake_frac, "task": task, "model_size": model_size,
    }  # fmt: skip
    out = Path(out_dir)
    meta_path = out / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("settings") == settings:
        if verbose:
            print(f"pretrain: reusing {out} (same settings)")
        model = LlamaForCausalLM.from_pretrained(out)
        return model, PreTrainedTokenizerFast.from_pretrained(out)

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, **model_size)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.98),
    )
    # Linear warm-up, then cosine to 10% of lr: stopping early is what keeps the model weak.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * (
                final_lr_frac
                + (1 - final_lr_frac) / 2 * (1 + math.cos(math.pi * min(s, steps) / steps))
            )
        ),
    )
    data = with_mistakes(
        make_problems(steps * batch_size, seed, "train", **task), mistake_frac, seed
    )
    t0 = time.perf_counter()
    for step in range(steps):
        ids, mask, labels = sft_batch(data[step * batch_size : (step + 1) * batch_size], tokenizer)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
        loss = F.cross_entropy(
            logits.flatten(0, 1), labels[:, 1:].flatten(), label_smoothing=label_smoothing
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if verbose and (step % 50 == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - t0:5.1f}s")
    train_s = time.perf_counter() - t0

    model.eval()
    heldout = make_problems(eval_n, seed + 1, "test", **task)
    greedy = accuracy(model, tokenizer, heldout)["pass@1"]
    meta = {"settings": settings, "train_seconds": round(train_s, 1), "heldout_greedy": greedy}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta_path.write_text(json.dumps(meta, indent=2))
    if verbose:
        print(f"pretrain: {steps} steps in {train_s:.1f}s, held-out greedy {greedy:.3f} -> {out}")
    return model, tokenizer


def main() -> None:
    """CLI: pre-train (or reuse) and report held-out greedy, pass@1 and pass@8 and wall time."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/arith_base")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-n", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model, tok = pretrain(args.out, steps=args.steps, seed=args.seed)
    t_train = time.perf_counter() - t0
    heldout = make_problems(args.eval_n, args.seed + 1, "test", **TASK)
    torch.manual_seed(args.seed)
    greedy = accuracy(model, tok, heldout)["pass@1"]
    sampled = accuracy(model, tok, heldout, greedy=False, samples=8, temperature=1.0)
    print(
        f"held-out (n={len(heldout)}): greedy {greedy:.3f}  pass@1 {sampled['pass@1']:.3f}  "
        f"pass@8 {sampled['pass@8']:.3f}  | pretrain {t_train:.1f}s, "
        f"total {time.perf_counter() - t0:.1f}s"
    )


if __name__ == "__main__":
    main()
