"""Training forward + backward on the SmolLM2-135M architecture through grpo_ar's training path
(`adapter.token_logprobs`: prompt scored once per group with its KV cache shared, fused chunked
LM head) vs HF's plain path (full sequences -> (B, T, V) logits -> log-softmax -> gather, as
TRL does), in one process, interleaved.

Batch: the bench_step SmolLM2 shape, 2 chat prompts x 8 completions of 64 tokens (fixed length).
MFU = 6·N·tokens / time / the fp32 matmul peak measured in this run, N = parameters (tied
embedding once), tokens = what GRPO must train: prompt tokens once per group + completion
tokens. HF's path (`logits_to_keep = T + 1`, as TRL calls it) is also shown against the tokens
it actually runs (prompt repeated G times).

The peak is probed (a 2048^3 fp32 matmul) in every interleaved round as well as at the start
and the end: `mfu` uses the best probe of the run (the conservative figure), `mfu_round` the
median over rounds of each round's MFU against that round's own probe (on a shared machine the
load changes between rounds; this one says what the code reaches under the load it ran in), and
`mfu_cpu` the same ratio in CPU seconds (probe and step; with --threads 1 this leaves out the
time other jobs held the core).
"""

from __future__ import annotations

import torch
from common import (
    cpu_share,
    header,
    interleaved,
    load,
    matmul_peak,
    median,
    n_params,
    parse_args,
    run_result,
    setup,
)

from grpo_ar.adapters.text import TextAdapter
from grpo_ar.generation.params import SamplingParams
from grpo_ar.types import Entry, Rollout

G, T = 8, 64
PROBE = 2048  # the peak probe's matmul size


def batch(tok, prompts) -> tuple[TextAdapter, Rollout]:
    adapter = TextAdapter(tok, SamplingParams(max_new_tokens=T))
    pb = adapter.encode([Entry(p, ()) for p in prompts])
    n = len(prompts) * G
    gen = torch.Generator().manual_seed(0)
    comp = torch.randint(3, 40_000, (n, T), generator=gen)
    idx = torch.arange(len(prompts)).repeat_interleave(G)
    rollout = Rollout(pb, G, comp, torch.ones(n, T), torch.zeros(n, T),
                      torch.ones(n, dtype=torch.bool), idx, idx.clone())  # fmt: skip
    return adapter, rollout


def main() -> None:
    args = parse_args(__doc__, repeats=5, quick_repeats=3)
    header("bench_mfu", args)
    model, tok, prompts, _, _ = setup("smol", 2)  # exits non-zero, saying how, without SmolLM2
    model.train()
    adapter, r = batch(tok, prompts)
    w = torch.randn(r.completion_ids.shape, generator=torch.Generator().manual_seed(1))
    ids, mask, idx = r.prompts.input_ids, r.prompts.attention_mask, r.prompt_index
    full = torch.cat([ids[idx], r.completion_ids], 1)
    full_mask = torch.cat([mask[idx], r.completion_mask.long()], 1)

    def ours():
        model.zero_grad(set_to_none=True)
        logp, ent = adapter.token_logprobs(model, r, with_entropy=True)
        (logp * w).sum().backward()

    def hf_plain():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=full, attention_mask=full_mask, logits_to_keep=T + 1)
        logits = out.logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, r.completion_ids[..., None])
        (logp.squeeze(-1) * w).sum().backward()

    probe_a, probe_b = torch.randn(PROBE, PROBE), torch.randn(PROBE, PROBE)
    peak0 = matmul_peak(PROBE)
    cpu: dict = {}
    times = interleaved(
        {"grpo_ar": ours, "hf_plain": hf_plain, "probe": lambda: probe_a @ probe_b},
        args.repeats,
        cpu,
    )
    round_peak = [2 * PROBE**3 / t / 1e9 for t in times.pop("probe")]
    cpu_peak = median([2 * PROBE**3 / t / 1e9 for t in cpu.pop("probe")])
    peak = max(peak0, matmul_peak(PROBE), *round_peak)
    n = n_params(model)
    p_tok = int(mask.sum())
    useful = p_tok + r.completion_mask.numel()
    hf_tokens = int(full_mask.sum())
    print(
        f"# N = {n / 1e6:.1f}M; prompt tokens {p_tok} (once per group), completion tokens "
        f"{r.completion_mask.numel()}; HF runs {hf_tokens} tokens; peak {peak:.0f} GFLOP/s "
        f"(probes per round: {', '.join(f'{p:.0f}' for p in round_peak)})"
    )
    mfu, mfu_round, mfu_cpu = {}, {}, {}
    for k, ts in times.items():
        s = median(ts)
        mfu[k] = 6 * n * useful / s / (peak * 1e9)
        mfu_round[k] = median([6 * n * useful / t / (p * 1e9) for t, p in zip(ts, round_peak)])
        mfu_cpu[k] = 6 * n * useful / median(cpu[k]) / (cpu_peak * 1e9)
        extra = ""
        if k == "hf_plain":
            extra = f"; on the tokens it runs {6 * n * hf_tokens / s / (peak * 1e9):.0%}"
        print(
            f"  {k:9s} fwd+bwd median {s:7.3f} s ({', '.join(f'{t:.2f}' for t in ts)}): "
            f"MFU {mfu[k]:.0%}{extra}; per-round MFU {mfu_round[k]:.0%}; on CPU time "
            f"{mfu_cpu[k]:.0%} of the probe's {cpu_peak:.0f} GFLOP/s per CPU second; CPU "
            f"{median(cpu[k]):.2f} s (share of the cores {cpu_share(s, median(cpu[k]))})"
        )
    print(f"# load after: {load()}")
    run_result(args, mfu=mfu["grpo_ar"], mfu_round=mfu_round["grpo_ar"], mfu_cpu=mfu_cpu["grpo_ar"],
               hf_mfu=mfu["hf_plain"],
               speedup=median(times["hf_plain"]) / median(times["grpo_ar"]), peak_gflops=peak)  # fmt: skip


if __name__ == "__main__":
    main()
