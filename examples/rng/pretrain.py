"""Supervised pre-training of the tiny RNG Llama on skewed digits: the low-entropy start.

    python examples/rng/pretrain.py --out runs/rng_base

Trains on `#<seed>:<digit><eos>` with digits drawn from p(k) ∝ 0.5^k (loss on digit and <eos>);
saves model + tokenizer + meta.json to `--out` and reuses the folder when its settings match.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as `rng.task`: see run.py
from rng.task import build_model, build_tokenizer, sft_rows  # noqa: E402

MODEL = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 256}


def pretrain(
    out_dir: str | Path, steps: int = 300, seed: int = 0, batch_size: int = 64, lr: float = 2e-3,
    verbose: bool = True,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:  # fmt: skip
    """AdamW on skewed digits for `steps` steps (fp32, constant lr); cached in `out_dir`."""
    settings = {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "model": MODEL}
    out = Path(out_dir)
    meta_path = out / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("settings") == settings:
        if verbose:
            print(f"pretrain: reusing {out} (same settings)")
        model = LlamaForCausalLM.from_pretrained(out)
        return model, PreTrainedTokenizerFast.from_pretrained(out)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, max_positions=16, **MODEL)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    data = sft_rows(steps * batch_size, seed)
    t0 = time.perf_counter()
    for step in range(steps):
        rows = data[step * batch_size : (step + 1) * batch_size]
        ids, mask, labels = sft_batch(rows, tokenizer)
        pos = (mask.cumsum(1) - 1).clamp(min=0)  # (B, T) positions from the first real token
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, :-1]
        loss = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if verbose and (step % 100 == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - t0:5.1f}s")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta = {"settings": settings, "train_seconds": round(time.perf_counter() - t0, 1)}
    meta_path.write_text(json.dumps(meta, indent=2))
    return model, tokenizer


def sft_batch(rows: list[dict[str, str]], tokenizer: PreTrainedTokenizerFast) -> tuple:
    """(ids, mask, labels) of `prompt + digit + <eos>`; labels -100 except on digit and <eos>.

    Prompts are left-padded (the tokenizer's side); the caller passes position ids counted
    from the first real token, as the sampler and `generate` do."""
    enc = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True)
    ans = torch.tensor([tokenizer.convert_tokens_to_ids(r["answer"]) for r in rows])
    eos = torch.full_like(ans, tokenizer.eos_token_id)
    ids = torch.cat([enc["input_ids"], ans[:, None], eos[:, None]], 1)  # (B, L + 2)
    mask = torch.cat([enc["attention_mask"], torch.ones(len(rows), 2, dtype=torch.long)], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    return ids, mask, labels


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/rng_base")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    pretrain(args.out, steps=args.steps)
