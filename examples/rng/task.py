"""RNG task: prompts `#<seed>:`, a completion is one digit; tokenizer, tiny Llama, statistics.

The model is asked for a random digit. Pre-training teaches it a skewed distribution
(p(k) ∝ 0.5^k, entropy 0.60·ln 10); GRPO with a group-level reward (group_entropy) should make
its digits uniform, and keep each prompt's samples diverse rather than mapping each prompt to
one digit (the collapse a pooled statistic alone would not see).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import random
from collections import Counter
from pathlib import Path

import torch

# The char-level tokenizer and tiny Llama of the arithmetic demo, loaded under its own name
# (both examples call their module `task`).
_spec = importlib.util.spec_from_file_location(
    "arith_task", Path(__file__).resolve().parents[1] / "text_arithmetic" / "task.py"
)
arith = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(arith)
build_model, completion_text = arith.build_model, arith.completion_text

CHARS = "0123456789#:"
DIGITS = "0123456789"
SKEW = 0.5


def build_tokenizer():
    return arith.build_tokenizer(CHARS)


def skewed_probs(ratio: float = SKEW) -> list[float]:
    """p(k) ∝ ratio^k over the digits 0..9."""
    w = [ratio**k for k in range(10)]
    return [x / sum(w) for x in w]


def make_prompts(n: int, split: str, heldout_frac: float = 0.2) -> list[str]:
    """The first `n` prompts `#<k>:` (k = 0, 1, ...) whose hash puts them in `split`."""
    out, k = [], 0
    while len(out) < n:
        p = f"#{k}:"
        h = int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "big") / 2**64
        if (h < heldout_frac) == (split == "test"):
            out.append(p)
        k += 1
    return out


def sft_rows(n: int, seed: int) -> list[dict[str, str]]:
    """`n` rows {"prompt", "answer"}: train prompts with digits drawn from `skewed_probs`."""
    rng = random.Random(seed)
    prompts = make_prompts(2000, "train")
    digits = rng.choices(DIGITS, weights=skewed_probs(), k=n)
    return [{"prompt": rng.choice(prompts), "answer": d} for d in digits]


@torch.no_grad()
def sample_digits(model, tokenizer, prompts: list[str], samples: int, seed: int) -> list[list[str]]:
    """`samples` completions per prompt at T = 1 (texts up to <eos>)."""
    torch.manual_seed(seed)
    was = model.training
    model.eval()
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(
        **enc, do_sample=True, temperature=1.0, top_k=None, top_p=None, max_new_tokens=2,
        num_return_sequences=samples, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model.train(was)
    texts = [completion_text(r, tokenizer) for r in out[:, enc["input_ids"].shape[1] :].tolist()]
    return [texts[i * samples : (i + 1) * samples] for i in range(len(prompts))]


def chi_square_uniform(counts: list[int]) -> tuple[float, float]:
    """Pearson's chi-square of digit counts against uniform, and its p-value (df = 9)."""
    n = sum(counts)
    stat = sum((c - n / 10) ** 2 / (n / 10) for c in counts)
    p = torch.special.gammaincc(torch.tensor(4.5, dtype=torch.float64), torch.tensor(stat / 2))
    return stat, float(p)


def entropy(counter: Counter) -> float:
    n = sum(counter.values())
    return -sum(c / n * math.log(c / n) for c in counter.values() if c) if n else 0.0


def statistics(groups: list[list[str]]) -> dict[str, float]:
    """Pooled entropy / ln 10, chi-square vs uniform, valid fraction, per-prompt diversity.

    Per prompt: distinct digits and entropy of its samples, averaged over prompts; for k samples
    from a uniform digit, E[distinct] = 10·(1 - 0.9^k) (6.51 at k = 10).
    """
    flat = [t for g in groups for t in g]
    digits = [t for t in flat if len(t) == 1 and t in DIGITS]
    counts = Counter(digits)
    stat, p = chi_square_uniform([counts[d] for d in DIGITS])
    per_prompt = [Counter(t for t in g if t in DIGITS) for g in groups]
    return {
        "entropy": entropy(counts) / math.log(10),
        "chi2": stat,
        "chi2_p": p,
        "valid": len(digits) / len(flat),
        "top_digit_frac": counts.most_common(1)[0][1] / len(digits) if digits else 0.0,
        "per_prompt_distinct": sum(len(c) for c in per_prompt) / len(groups),
        "per_prompt_entropy": sum(entropy(c) for c in per_prompt) / len(groups) / math.log(10),
    }
