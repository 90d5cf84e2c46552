"""Peak resident memory and step time of one GRPO step on SmolLM2-135M-Instruct: full
fine-tuning (+ a frozen reference copy) vs peft LoRA vs LyCORIS LoRA (bypass mode), side by side.

    python benchmarks/bench_memory.py [--quick] [--threads N]

Each variant runs in its own subprocess, so each peak is its own: peak RSS is the process's
`resource.getrusage(RUSAGE_SELF).ru_maxrss` (the kernel's high-water mark of resident memory,
CPU only). It includes the activations of the update pass (~2 GB at 16 x ~100 tokens here: every
variant backpropagates through all 30 layers), so it is complemented by what stays held: RSS
after the steps once freed memory is handed back (`malloc_trim`, via psutil) and exact tensor
sizes of the policy, the reference (FrozenCopy: a second model; adapters: the frozen adapter
copy, the reference having been refreshed once before the steps) and the optimizer state.
Two steps per variant (the second runs with Adam's state allocated); the time is step 2's:
sampling 2 prompts x G=8 + reward + the reference pass (beta = 0.04) + the update. The machine
is shared: timings are only comparable within one run. The last line is
`RESULT full_mb=... peft_mb=... lycoris_mb=...` (peak RSS) plus more keys.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "runs" / "smollm2-135m-instruct"
VARIANTS = {
    "full": dict(method="full"),
    "peft": dict(method="peft", algo="lora", rank=16, alpha=32.0),
    "lycoris": dict(method="lycoris", algo="lora", rank=16, alpha=32.0, bypass=True),
    "lycoris_dense": dict(method="lycoris", algo="lora", rank=16, alpha=32.0, bypass=False),
}
PROMPTS = ["What is 17 + 25? Answer with a number.", "Name three prime numbers."]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_variant(name: str, tokens: int, steps: int, threads: int, model_dir: Path) -> dict:
    """One variant in this process: load, build, `steps` GRPO steps; returns the figures."""
    import psutil
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from grpo_ar.adapters.text import TextAdapter, load_text_model
    from grpo_ar.config import load_config
    from grpo_ar.finetune import FinetuneConfig, build_finetune
    from grpo_ar.io.data import load_rows
    from grpo_ar.train.trainer import Trainer

    run_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_memory_{name}_{os.getpid()}"
    cfg = load_config(
        None,
        [
            f"sampling.max_new_tokens={tokens}",
            "trainer.batch_size=2",
            f"trainer.steps={steps}",
            "trainer.lr=1e-5",
            "algorithm.group_size=8",
            "algorithm.beta=0.04",
            f"log.run_dir={run_dir}",
            "log.progress=false",
            "log.samples_per_step=0",
        ],
    )
    model, tok = load_text_model(str(model_dir))
    loaded_mb = psutil.Process().memory_info().rss / 2**20
    ft = build_finetune(model, FinetuneConfig(**VARIANTS[name]), need_reference=True)
    adapter = TextAdapter(tok, cfg.sampling)
    rows = [{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS]
    spec = {"name": "regex_format", "args": {"pattern": r"\d+"}}
    entries = load_rows([{**r, "rewards": [spec]} for r in rows])
    trainer = Trainer(cfg, ft.model, adapter, entries, finetune=ft)
    ft.reference.refresh(ft.model)  # measure the steady state: a reference after an iteration
    torch.manual_seed(0)
    times, lengths = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        m = trainer.train_step()
        times.append(time.perf_counter() - t0)
        lengths.append(m["completion/length_mean"])
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed activations back: RSS = what is held
    held_mb = psutil.Process().memory_info().rss / 2**20
    return {
        "variant": name,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "held_rss_mb": round(held_mb, 1),
        "loaded_rss_mb": round(loaded_mb, 1),
        "policy_mb": _mb(ft.model.parameters()),
        "reference_mb": _mb(_reference_tensors(ft.reference)),
        "optimizer_mb": _mb(
            t for st in trainer.optimizer.state.values() for t in st.values() if t.dim() > 0
        ),
        "trainable_params": sum(p.numel() for p in ft.model.parameters() if p.requires_grad),
        "step_s": round(times[-1], 2),
        "first_step_s": round(times[0], 2),
        "completion_len": round(lengths[-1], 1),
    }


def _mb(tensors) -> float:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:  # tied weights once
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return round(total / 2**20, 1)


def _reference_tensors(ref):
    if hasattr(ref, "model"):  # FrozenCopy: a whole second model
        return list(ref.model.parameters())
    return list(ref.state_dict().values())  # AdapterReference: the frozen adapter copy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="8 new tokens (default 64)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (shared machine)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--model", type=Path, default=MODEL, help="SmolLM2-135M-Instruct folder")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    tokens, steps = (8, 2) if args.quick else (64, 2)  # step 2 runs with optimizer state
    if args.child:
        print(
            "JSON " + json.dumps(run_variant(args.child, tokens, steps, args.threads, args.model))
        )
        return
    if not (args.model / "config.json").exists():
        sys.exit(f"{args.model} is missing: run examples/smollm2_reasoning/prepare.py first")
    print(
        f"SmolLM2-135M-Instruct fp32, GRPO step = 2 prompts x G=8, <= {tokens} new tokens, "
        f"beta=0.04 (reference pass on), {steps} step(s) per variant, {args.threads} thread(s)."
    )
    print("peak RSS = resource.getrusage(RUSAGE_SELF).ru_maxrss of a fresh subprocess per variant")
    results = {}
    for name in args.variants.split(","):
        cmd = [sys.executable, __file__, "--child", name, "--threads", str(args.threads)]
        cmd += ["--model", str(args.model)]
        cmd += ["--quick"] if args.quick else []
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [x for x in out.stdout.splitlines() if x.startswith("JSON ")]
        if out.returncode or not line:
            sys.exit(f"variant {name} failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads(line[0][5:])
    cols = ["variant", "peak_rss_mb", "held_rss_mb", "loaded_rss_mb", "policy_mb"]
    cols += ["reference_mb", "optimizer_mb", "trainable_params", "step_s", "completion_len"]
    print("  ".join(f"{c:>14}" for c in cols))
    for r in results.values():
        print("  ".join(f"{r[c]!s:>14}" for c in cols))
    keys = " ".join(f"{n}_mb={r['peak_rss_mb']}" for n, r in results.items())
    keys += " " + " ".join(f"{n}_step_s={r['step_s']}" for n, r in results.items())
    print(f"RESULT {keys}")


if __name__ == "__main__":
    main()
