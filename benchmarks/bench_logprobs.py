"""The log-prob path from final hidden states through the LM head to per-token log-probs and
entropy, forward + backward: grpo_ar's fused chunked head vs the naive
`lm_head -> log_softmax -> gather` (B = 8, T = 512, hidden 576, V = 49,152: SmolLM2's head).

Memory: peak RSS growth of one forward + backward in a fresh subprocess per variant (Linux
VmHWM reset through /proc/self/clear_refs; glibc told to mmap every block >= 1 MiB so freed
memory leaves RSS), i.e. everything the step allocates, torch's allocator included.
Values: `max_abs_err` is grpo_ar's largest |error| in log-prob and entropy against the exact
naive values (the naive formula evaluated in fp64 on the same fp32 inputs); the fp32 naive
path's own error and the fp32-vs-fp32 difference are printed beside it (fp32 summation over
49k terms alone moves the naive entropy by ~1e-5). Gradients: max |Δ| / max |naive| per input.
`mem_ratio` and `time_ratio` are grpo_ar / naive: lower is better.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from common import header, interleaved, load, matmul_peak, median, parse_args, result

from grpo_ar.core.logprobs import fused_head_logprobs

B, T, H, V = 8, 512, 576, 49_152


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, T, H, generator=g)).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.05).requires_grad_()
    ids = torch.randint(0, V, (B, T), generator=g)
    w_lp, w_ent = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    return hidden, weight, ids, w_lp, w_ent


def naive(hidden, weight, ids):
    logp_all = torch.log_softmax(hidden @ weight.t(), -1)  # (B, T, V)
    logp = logp_all.gather(-1, ids[..., None]).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


@torch.no_grad()
def exact(hidden, weight, ids):
    """The naive values in fp64, one sequence at a time."""
    out = [naive(h.double(), weight.double(), i) for h, i in zip(hidden[:, None], ids[:, None])]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def fused(hidden, weight, ids):
    return fused_head_logprobs(hidden, weight, ids, with_entropy=True)


VARIANTS = {"naive": naive, "grpo_ar": fused}


def step(fn, hidden, weight, ids, w_lp, w_ent):
    hidden.grad = weight.grad = None
    logp, ent = fn(hidden, weight, ids)
    ((logp * w_lp).sum() + (ent * w_ent).sum()).backward()
    return logp.detach(), ent.detach()


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def child(name: str) -> None:
    """One fwd+bwd in this fresh process; prints the peak RSS growth in bytes."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    args = inputs()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _status("VmRSS")
    step(VARIANTS[name], *args)
    print(json.dumps({"peak": _status("VmHWM") - base}))


def peak_rss(name: str, threads: int) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", BENCH_THREADS=str(threads))
    out = subprocess.run(
        [sys.executable, __file__, "--child", name], env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def main() -> None:
    if "--child" in sys.argv:
        return child(sys.argv[sys.argv.index("--child") + 1])
    args = parse_args(__doc__, repeats=5, quick_repeats=3)
    header("bench_logprobs", args)
    print(f"# B={B} T={T} H={H} V={V}; fp32; loss = Σ w1·logp + Σ w2·entropy")
    peak0 = matmul_peak()
    mem = {k: peak_rss(k, args.threads) for k in VARIANTS}
    for k, v in mem.items():
        print(f"peak RSS growth fwd+bwd  {k:8s} {v / 2**20:9.1f} MiB")

    x = inputs()
    (lp_n, ent_n), g_n = step(naive, *x), (x[0].grad.clone(), x[1].grad.clone())
    (lp_f, ent_f), g_f = step(fused, *x), (x[0].grad.clone(), x[1].grad.clone())
    lp_x, ent_x = exact(x[0].detach(), x[1].detach(), x[2])

    def err(lp, ent):
        return max(float((lp - lp_x).abs().max()), float((ent - ent_x).abs().max()))

    max_abs, naive_err = err(lp_f.double(), ent_f.double()), err(lp_n.double(), ent_n.double())
    vs_fp32 = max(float((lp_n - lp_f).abs().max()), float((ent_n - ent_f).abs().max()))
    rel = [float((a - b).abs().max() / b.abs().max()) for a, b in zip(g_f, g_n)]
    print(
        f"max |error| vs exact (fp64) naive: grpo_ar {max_abs:.2e}, naive fp32 {naive_err:.2e}; "
        f"grpo_ar vs naive fp32 {vs_fp32:.2e}"
    )
    print(f"gradient max rel err vs naive fp32: hidden {rel[0]:.2e}, weight {rel[1]:.2e}")

    times = interleaved({k: (lambda f=f: step(f, *x)) for k, f in VARIANTS.items()}, args.repeats)
    for k, ts in times.items():
        print(f"fwd+bwd {k:8s} median {median(ts):7.3f} s  ({', '.join(f'{t:.2f}' for t in ts)})")
    peak = max(peak0, matmul_peak())
    flops = 3 * 2 * B * T * H * V
    for k, ts in times.items():
        print(
            f"  {k:8s} {flops / median(ts) / 1e9:6.1f} GFLOP/s = {flops / median(ts) / 1e9 / peak:.0%} "
            f"of the {peak:.0f} GFLOP/s matmul peak (3 head matmuls counted)"
        )
    print(f"# load after: {load()}")
    result(
        mem_ratio=mem["grpo_ar"] / mem["naive"],
        max_abs_err=max_abs,
        time_ratio=median(times["grpo_ar"]) / median(times["naive"]),
        grad_rel_err=max(rel),
        naive_fp32_err=naive_err,
        err_vs_naive_fp32=vs_fp32,
        mem_naive_mib=mem["naive"] / 2**20,
        mem_grpo_ar_mib=mem["grpo_ar"] / 2**20,
        peak_gflops=peak,
        load=load(),
    )


if __name__ == "__main__":
    main()
