"""grpo_ar's sampler vs `model.generate(num_return_sequences=G, do_sample=True, top_p=...)` for
the same model, prompts, lengths and sampling distribution, in new tokens per second (tokens up
to and including EOS; both stop a row at EOS and the whole batch when every row has ended).

Configs (the issue's): tiny Llama (hidden 256, 4 layers, char tokenizer), 4 prompts x 8,
32 new tokens; SmolLM2-135M-Instruct, 2 chat prompts x 8, <= 64 new tokens. Temperature 1,
top-p 0.95 (HF's default top-k 50 disabled). `ratio` = grpo_ar tokens/s / HF tokens/s (the
alternative's time per token / grpo_ar's): higher is better. `vllm_ratio` = the vLLM backend's
tokens/s / grpo_ar's on SmolLM2 (4 prompts x 8 x 64 tokens, EOS not ending rows; needs
.venv-vllm from `make vllm`, else NaN); `vllm_start_s` its engine start-up (`vllm_threads`,
`vllm_compiled`: how it ran). Prefill: the prompt pass alone,
each prompt once (shared) vs repeated G times; `prefill_ratio` = shared / repeated (ideal 1/G).
`*_cpu_ratio`: HF's CPU seconds per call / grpo_ar's (with --threads 1, free of the time other
jobs on a shared machine held the core). Both samplers draw tokens as `torch.multinomial` does
(an exponential race) from generators seeded alike; in our runs they produced the same number
of tokens call by call, i.e. the same completions: the same work.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import (
    cpu_share,
    header,
    interleaved,
    load,
    matmul_peak,
    median,
    need_smollm2,
    parse_args,
    run_result,
    setup,
)

from grpo_ar.adapters.text import TextAdapter
from grpo_ar.generation.decode_step import Decoder, fast_step_for
from grpo_ar.generation.decode_weights import DecodeWeights, reusing
from grpo_ar.generation.params import SamplingParams
from grpo_ar.types import Entry

TOP_P = 0.95
RUN = {"device": "cpu"}  # --device (benchmarks/gpu_check.sh: cuda)


def completion_tokens(new: torch.Tensor, eos: int) -> int:
    """(R, T) generated ids -> tokens up to and including each row's first EOS."""
    is_eos = new == eos
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, new.shape[1])
    return int(first.sum())


def bench(name: str, args) -> dict[str, float]:
    model, tok, prompts, g, max_new = setup(name, 4 if name == "tiny" else 2)
    model = model.to(RUN["device"])
    params = SamplingParams(max_new_tokens=max_new, temperature=1.0, top_p=TOP_P)
    adapter = TextAdapter(tok, params)
    pb = adapter.encode([Entry(p, ()) for p in prompts]).to(RUN["device"])
    eos, pad = adapter.sampling.eos_token_ids[0], adapter.sampling.pad_token_id
    gen = torch.Generator(device=RUN["device"]).manual_seed(0)
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
    build = weight_build(model, adapter, pb.input_ids.shape[1] + max_new, args.repeats)
    print(
        f"  decode weights: built {build['build_ms']:.1f} ms per sample call (CPU "
        f"{build['build_cpu_ms']:.1f} ms), reused {build['reused_ms']:.2f} ms (one call "
        f"{median(times['grpo_ar']):.3f} s)"
    )
    return {"ratio": ratio, "prefill": pre_ratio, "tps": median(tps["grpo_ar"]),
            "hf_tps": median(tps["hf_generate"]), "cpu_ratio": cpu_ratio, **build}  # fmt: skip


def weight_build(model, adapter, capacity: int, repeats: int) -> dict[str, float]:
    """FastStep's weight copies (fused q/k/v and gate/up, transposed on the CPU) taken for a
    sample call: built (every call outside the trainer's backend, and the first call of each
    weights version in it) vs reused from a `DecodeWeights` store of one version."""
    call = adapter.model_call(model)
    store = DecodeWeights()
    store.set_version(0)

    def reused():
        with reusing(store):
            fast_step_for(call, capacity)

    cpu: dict = {}
    fns = {"build": lambda: fast_step_for(call, capacity), "reused": reused}
    t = interleaved(fns, repeats, cpu)
    return {"build_ms": median(t["build"]) * 1e3, "reused_ms": median(t["reused"]) * 1e3,
            "build_cpu_ms": median(cpu["build"]) * 1e3}  # fmt: skip


VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"


def bench_vllm(args) -> dict[str, float]:
    """SmolLM2, 4 chat prompts x 8, 64 new tokens with EOS not ending a row (the same 2,048
    tokens a call for both): grpo_ar's sampler vs the vLLM backend (a `grpo-ar vllm-serve`
    server in .venv-vllm, fp32, --threads each unless --vllm-threads), alternating; engine
    start-up timed apart."""
    from grpo_ar.generation.vllm_backend import VllmBackend
    from grpo_ar.generation.vllm_server import ServerClient, spawn_server

    model, tok, prompts, g, max_new = setup("smol", 4)
    adapter = TextAdapter(tok, SamplingParams(max_new_tokens=max_new, temperature=1.0))
    adapter.sampling = replace(adapter.sampling, eos_token_ids=())  # fixed-length rows
    pb = adapter.encode([Entry(p, ()) for p in prompts])
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    log = Path(tempfile.mkdtemp()) / "vllm-serve.log"
    vllm_threads = args.vllm_threads or args.threads or 1
    env = {"OMP_NUM_THREADS": str(vllm_threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    os.environ.update(env)  # the server inherits them
    flags = ("--compile", "on" if args.vllm_compile else "off")
    proc, start_s = spawn_server(str(VLLM_PYTHON), str(need_smollm2()), port, str(log), flags)
    try:
        backend = VllmBackend(ServerClient("127.0.0.1", port, 600), adapter.sampling)
        gen = torch.Generator().manual_seed(0)
        counts: dict[str, list[int]] = {"grpo_ar": [], "vllm": []}

        def run(name, fn):
            return lambda: counts[name].append(int(fn(model, pb, g, generator=gen).lengths.sum()))

        times = interleaved(
            {"grpo_ar": run("grpo_ar", adapter.sample), "vllm": run("vllm", backend.generate)},
            args.repeats,
        )
    finally:
        proc.kill()
        proc.wait()
    tps = {k: [c / t for c, t in zip(counts[k][1:], times[k])] for k in times}
    print(f"[smol vllm] {len(prompts)} prompts x {g}, {max_new} new tokens; load {load()}")
    mode = "compiled" if args.vllm_compile else "eager"
    print(f"  vllm engine start-up {start_s:.1f} s (SmolLM2 fp32, server process, {mode}, "
          f"{vllm_threads} thread(s); grpo_ar {torch.get_num_threads()})")  # fmt: skip
    if vllm_threads != torch.get_num_threads():
        print("  NOTE: the two samplers run on different thread counts: not a like-for-like ratio")
    for k in times:
        print(
            f"  {k:8s} {median(tps[k]):8.1f} new tokens/s (s: {', '.join(f'{t:.2f}' for t in times[k])})"
        )
    ratio = median(tps["vllm"]) / median(tps["grpo_ar"])
    print(f"  vllm_ratio (vLLM / grpo_ar tokens/s) {ratio:.2f}")
    return {"ratio": ratio, "tps": median(tps["vllm"]), "start_s": start_s,
            "threads": vllm_threads, "compiled": int(args.vllm_compile)}  # fmt: skip


def main() -> None:
    def extra(p):
        p.add_argument("--device", default="cpu", help="cpu or cuda")
        p.add_argument(
            "--vllm-only",
            action="store_true",
            help="only the vLLM part (the other RESULT keys are NaN)",
        )
        p.add_argument(
            "--vllm-threads",
            type=int,
            default=0,
            help="the vLLM server's threads (default: --threads, like for like)",
        )
        p.add_argument("--vllm-compile", action="store_true",
                       help="start the engine on vLLM's compiled path (vllm-serve --compile on)")  # fmt: skip

    args = parse_args(__doc__, repeats=5, quick_repeats=3, extra=extra)
    RUN["device"] = args.device
    header("bench_sampler", args)
    peak = matmul_peak()
    print(f"# fp32 matmul peak {peak:.0f} GFLOP/s")
    start = time.perf_counter()
    skipped = dict.fromkeys(("ratio", "prefill", "cpu_ratio", "build_ms", "reused_ms",
                             "build_cpu_ms", "tps", "hf_tps"), float("nan"))  # fmt: skip
    tiny = skipped if args.vllm_only else bench("tiny", args)
    smol = skipped if args.vllm_only else bench("smol", args)
    vl = (
        bench_vllm(args)
        if VLLM_PYTHON.exists() and args.device == "cpu"
        else dict.fromkeys(("ratio", "tps", "start_s", "threads", "compiled"), float("nan"))
    )
    print(f"# {time.perf_counter() - start:.0f} s; load after: {load()}")
    run_result(
        args,
        tiny_ratio=tiny["ratio"],
        smol_ratio=smol["ratio"],
        prefill_ratio=smol["prefill"],
        tiny_cpu_ratio=tiny["cpu_ratio"],
        smol_cpu_ratio=smol["cpu_ratio"],
        vllm_ratio=vl["ratio"],
        vllm_tokens_per_s=vl["tps"],
        vllm_start_s=vl["start_s"],
        vllm_threads=vl["threads"],
        vllm_compiled=vl["compiled"],
        tiny_prefill_ratio=tiny["prefill"],
        tiny_weight_build_ms=tiny["build_ms"],
        tiny_weight_reused_ms=tiny["reused_ms"],
        smol_weight_build_ms=smol["build_ms"],
        smol_weight_reused_ms=smol["reused_ms"],
        smol_weight_build_cpu_ms=smol["build_cpu_ms"],
        tiny_tokens_per_s=tiny["tps"],
        tiny_hf_tokens_per_s=tiny["hf_tps"],
        smol_tokens_per_s=smol["tps"],
        smol_hf_tokens_per_s=smol["hf_tps"],
        peak_gflops=peak,
    )


if __name__ == "__main__":
    main()
