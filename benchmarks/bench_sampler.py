"""grpo_ar's sampler vs `model.generate(num_return_sequences=G, do_sample=True, top_p=...)` for
the same model, prompts, lengths and sampling distribution, in new tokens per second (tokens up
to and including EOS; both stop a row at EOS and the whole batch when every row has ended).

Configs (the issue's): tiny Llama (hidden 256, 4 layers, char tokenizer), 4 prompts x 8,
32 new tokens; SmolLM2-135M-Instruct, 2 chat prompts x 8, <= 64 new tokens. Temperature 1,
top-p 0.95 (HF's default top-k 50 disabled). `ratio` = grpo_ar tokens/s / HF tokens/s (the
alternative's time per token / grpo_ar's): higher is better. Prefill: the prompt pass alone,
each prompt once (shared) vs repeated G times; `prefill_ratio` = shared / repeated (ideal 1/G).
`*_cpu_ratio`: HF's CPU seconds per call / grpo_ar's (with --threads 1, free of the time other
jobs on a shared machine held the core). Both samplers draw tokens as `torch.multinomial` does
(an exponential race) from generators seeded alike; in our runs they produced the same number
of tokens call by call, i.e. the same completions: the same work.
"""

from __future__ import annotations

import time

import torch
from common import (
    cpu_share,
    header,
    interleaved,
    load,
    matmul_peak,
    median,
    parse_args,
    run_result,
    setup,
)

from grpo_ar.adapters.text import TextAdapter
from grpo_ar.generation.decode_step import Decoder
from grpo_ar.generation.params import SamplingParams
from grpo_ar.types import Entry

TOP_P = 0.95


def completion_tokens(new: torch.Tensor, eos: int) -> int:
    """(R, T) generated ids -> tokens up to and including each row's first EOS."""
    is_eos = new == eos
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, new.shape[1])
    return int(first.sum())


def bench(name: str, args) -> dict[str, float]:
    model, tok, prompts, g, max_new = setup(name, 4 if name == "tiny" else 2)
    params = SamplingParams(max_new_tokens=max_new, temperature=1.0, top_p=TOP_P)
    adapter = TextAdapter(tok, params)
    pb = adapter.encode([Entry(p, ()) for p in prompts])
    eos, pad = adapter.sampling.eos_token_ids[0], adapter.sampling.pad_token_id
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    counts: dict[str, list[int]] = {"grpo_ar": [], "hf_generate": []}

    def ours():
        counts["grpo_ar"].append(int(adapter.sample(model, pb, g, generator=gen).lengths.sum()))

    def hf():
        out = model.generate(
            input_ids=pb.input_ids,
            attention_mask=pb.attention_mask,
            do_sample=True,
            temperature=1.0,
            top_p=TOP_P,
            top_k=0,
            max_new_tokens=max_new,
            num_return_sequences=g,
            pad_token_id=pad,
            eos_token_id=eos,
        )
        counts["hf_generate"].append(completion_tokens(out[:, pb.input_ids.shape[1] :], eos))

    cpu: dict = {}
    times = interleaved({"grpo_ar": ours, "hf_generate": hf}, args.repeats, cpu)
    tps = {k: [c / t for c, t in zip(counts[k][1:], times[k])] for k in times}
    print(
        f"[{name}] {len(prompts)} prompts x {g}, <= {max_new} new tokens, prompt width "
        f"{pb.input_ids.shape[1]}; load {load()}"
    )
    for k in times:
        print(
            f"  {k:12s} {median(tps[k]):8.1f} new tokens/s  median {median(times[k]):.3f} s/call "
            f"(tokens/call {median(counts[k][1:]):.0f}; s: {', '.join(f'{t:.2f}' for t in times[k])}"
            f"); CPU {median(cpu[k]):.3f} s/call (share {cpu_share(median(times[k]), median(cpu[k]))})"
        )
    ratio = median(tps["grpo_ar"]) / median(tps["hf_generate"])
    cpu_ratio = median(cpu["hf_generate"]) / median(cpu["grpo_ar"])
    print(f"  ratio (grpo_ar / HF tokens/s) {ratio:.2f}; in CPU seconds per call {cpu_ratio:.2f}")

    def prefill(share):  # fast=False: the one-time FastStep weight copies are not prefill
        with torch.no_grad():
            dec = Decoder(model, adapter.sampling, fast=False)
            dec.prefill(pb.input_ids, pb.attention_mask, g, share)

    pre = interleaved({"shared": lambda: prefill(True), "repeated": lambda: prefill(False)},
                      args.repeats)  # fmt: skip
    pre_ratio = median(pre["shared"]) / median(pre["repeated"])
    print(
        f"  prefill: shared {median(pre['shared']) * 1e3:.1f} ms, repeated x{g} "
        f"{median(pre['repeated']) * 1e3:.1f} ms, ratio {pre_ratio:.3f} (1/G = {1 / g:.3f})"
    )
    return {"ratio": ratio, "prefill": pre_ratio, "tps": median(tps["grpo_ar"]),
            "hf_tps": median(tps["hf_generate"]), "cpu_ratio": cpu_ratio}  # fmt: skip


def main() -> None:
    args = parse_args(__doc__, repeats=5, quick_repeats=3)
    header("bench_sampler", args)
    peak = matmul_peak()
    print(f"# fp32 matmul peak {peak:.0f} GFLOP/s")
    start = time.perf_counter()
    tiny = bench("tiny", args)
    smol = bench("smol", args)
    print(f"# {time.perf_counter() - start:.0f} s; load after: {load()}")
    run_result(
        args,
        tiny_ratio=tiny["ratio"],
        smol_ratio=smol["ratio"],
        prefill_ratio=smol["prefill"],
        tiny_cpu_ratio=tiny["cpu_ratio"],
        smol_cpu_ratio=smol["cpu_ratio"],
        tiny_prefill_ratio=tiny["prefill"],
        tiny_tokens_per_s=tiny["tps"],
        tiny_hf_tokens_per_s=tiny["hf_tps"],
        smol_tokens_per_s=smol["tps"],
        smol_hf_tokens_per_s=smol["hf_tps"],
        peak_gflops=peak,
    )


if __name__ == "__main__":
    main()
