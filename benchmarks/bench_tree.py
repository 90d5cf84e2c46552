"""Tree sampling ([sampling.tree]) vs independent sampling at equal G: model tokens computed per
group, and wall time of the samplers.

Model: tiny random-init Llama (hidden 256, 4 layers, vocab 64); 4 prompts of 12 tokens, G = 8
completions of exactly 32 tokens (no EOS, so both make the same number of leaf tokens).
Tokens computed per group = the prompt (once per prompt in both: shared prefill) + decoded
row-steps (one token each). Independent sampling decodes G·T; a tree decodes each segment
once: with one root, branching b and depth D and segments of s tokens,
s·(1 + b + … + b^(D-1)) + b^D·(T - D·s). `tokens_ratio` = tree / independent (the issue's
target: <= 0.6 at b = 2, D = 3), counted by the tree sampler itself, checked against the
formula. Wall times: `sampler.sample` (flat, the library's default) vs `tree.tree_sample`,
interleaved medians; `time_ratio` = tree / flat.
"""

from __future__ import annotations

import torch
from common import header, interleaved, load, median, parse_args, result

from grpo_ar.generation.params import SamplingParams, TreeParams
from grpo_ar.generation.sampler import sample
from grpo_ar.generation.tree import tree_sample
from grpo_ar.types import Entry, PromptBatch

P, G, T, L, V = 4, 8, 32, 12, 64


def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def expected(b: int, d: int, s: int, roots: int = 1) -> int:
    return roots * (s * sum(b**k for k in range(d)) + b**d * (T - d * s))


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], repeats=7, quick_repeats=3)
    header("bench_tree", args)
    net = model()
    ids = torch.randint(3, V, (P, L), generator=torch.Generator().manual_seed(1))
    prompts = PromptBatch(ids, torch.ones_like(ids), [Entry(str(i), ()) for i in range(P)])
    flat = SamplingParams(max_new_tokens=T, eos_token_ids=())
    flat_tokens = L + G * T  # per group
    print(f"per group: prompt {L} tokens + {G} x {T} new; independent = {flat_tokens} tokens")
    print("| branching | depth | segment | tree tokens/group | ratio | formula |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = {}
    for b, d, s in ((2, 3, 4), (2, 3, 8), (2, 3, 10), (2, 2, 8), (8, 1, 8)):
        p = SamplingParams(max_new_tokens=T, eos_token_ids=(), tree=TreeParams(b, d, s))
        r = tree_sample(net, prompts, G, p, generator=torch.Generator().manual_seed(0))
        got, want = r.extras["tree_stats"]["decoded_tokens"] // P, expected(b, d, s, G // b**d)
        if got != want:
            raise SystemExit(f"decoded {got} tokens per group, the formula says {want}")
        rows[(b, d, s)] = (L + got) / flat_tokens
        print(f"| {b} | {d} | {s} | {L + got} | {rows[(b, d, s)]:.3f} | {L + want} |")
    tree = SamplingParams(max_new_tokens=T, eos_token_ids=(), tree=TreeParams(2, 3, 8))
    gen = torch.Generator()
    fns = {
        "flat": lambda: sample(net, prompts, G, flat, generator=gen.manual_seed(0)),
        "tree": lambda: tree_sample(net, prompts, G, tree, generator=gen.manual_seed(0)),
    }
    times = interleaved(fns, args.repeats)
    tf, tt = median(times["flat"]), median(times["tree"])
    print(f"wall per call ({P} prompts x {G}): flat {tf * 1e3:.1f} ms, tree (2, 3, 8) "
          f"{tt * 1e3:.1f} ms; load {load()}")  # fmt: skip
    result(
        tokens_ratio=rows[(2, 3, 8)], tokens_ratio_seg4=rows[(2, 3, 4)],
        time_ratio=tt / tf, flat_ms=tf * 1e3, tree_ms=tt * 1e3,
    )  # fmt: skip


if __name__ == "__main__":
    main()
