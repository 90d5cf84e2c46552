"""One-step async rollouts: seconds per GRPO step with the vLLM server backend, on-policy
(`rollout.async_steps = 0`) vs one step ahead (`= 1`), same trainer, same server, in alternating
blocks of steps. The server runs in .venv-vllm with one thread, the trainer with one thread: on 2
cores each side holds one. Ideal async step = max(sample, train) instead of their sum.

Configs: smol (SmolLM2-135M-Instruct, 2 chat prompts x 8, <= 64 new tokens, mu 1, beta 0.04) or
tiny (tiny Llama, 4 prompts x 8, 32 new tokens). RESULT `async_speedup` = on-policy seconds per
step / async seconds per step (first step of each block dropped: it switches modes).
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common import header, load, median, need_smollm2, parse_args, result, setup

from grpo_ar.adapters.text import TextAdapter
from grpo_ar.config import load_config
from grpo_ar.generation.vllm_server import spawn_server
from grpo_ar.io.data import load_rows
from grpo_ar.train.trainer import Trainer

VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"


def trainer_for(name: str, port: int, run_dir: Path):
    model, tok, prompts, g, max_new = setup(name, 2 if name == "smol" else 4)
    cfg = load_config(
        None,
        [
            f"algorithm.group_size={g}",
            "algorithm.beta=0.04",
            f"trainer.batch_size={len(prompts)}",
            "trainer.lr=1e-6",
            "trainer.steps=1000000",
            "trainer.threads=1",
            f"sampling.max_new_tokens={max_new}",
            f"log.run_dir={run_dir}",
            "log.progress=false",
            "log.samples_per_step=0",
            "rollout.backend=vllm",
            "rollout.vllm_mode=server",
            f"rollout.port={port}",
            "rollout.async_steps=1",
        ],
    )
    entries = load_rows(
        [{"prompt": p, "rewards": {"regex_format": {"pattern": r"\d"}}} for p in prompts]
    )
    adapter = TextAdapter(tok, cfg.sampling)
    return model, Trainer(cfg, model, adapter, entries)


def main() -> None:
    def extra(p):
        p.add_argument("--config", default="smol", choices=("smol", "tiny"))

    args = parse_args(__doc__, repeats=4, quick_repeats=2, extra=extra)
    header("bench_async", args)
    tmp = Path(tempfile.mkdtemp(prefix="bench_async_"))
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    if args.config == "smol":
        model_dir = str(need_smollm2())
    else:
        model, _ = setup("tiny", 4)[:2]
        model.save_pretrained(tmp / "model")
        model_dir = str(tmp / "model")
    os.environ.update(OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="nobind")
    proc, start_s = spawn_server(str(VLLM_PYTHON), model_dir, port, str(tmp / "server.log"))
    print(f"# vllm-serve start-up {start_s:.1f} s ({args.config})")
    try:
        _, tr = trainer_for(args.config, port, tmp / "run")
        base = tr.cfg
        times: dict[str, list[float]] = {"sync": [], "async": []}
        parts: dict[str, list[tuple[float, float]]] = {"sync": [], "async": []}
        for _ in range(2):
            for mode in ("sync", "async"):
                tr.cfg = replace(
                    base, rollout=replace(base.rollout, async_steps=int(mode == "async"))
                )
                for i in range(args.repeats + 1):
                    t = time.perf_counter()
                    m = tr.train_step()
                    if i:  # the first step of a block switches modes
                        times[mode].append(time.perf_counter() - t)
                        parts[mode].append((m.get("time/sample", 0.0), m.get("time/update", 0.0)))
                    print(f"  {mode:5s} step {tr.step}: {time.perf_counter() - t:.2f} s "
                          f"(sample wait {m.get('time/sample', 0):.2f}, update {m.get('time/update', 0):.2f})")  # fmt: skip
    finally:
        proc.kill()
        proc.wait()
    s, a = median(times["sync"]), median(times["async"])
    sample = median([p[0] for p in parts["sync"]])
    train = s - sample
    print(f"[{args.config}] on-policy {s:.2f} s/step (sample {sample:.2f} + rest {train:.2f}); "
          f"async {a:.2f} s/step; ideal max(sample, rest) {max(sample, train):.2f}; load {load()}")  # fmt: skip
    result(async_speedup=s / a, sync_s=s, async_s=a, sample_s=sample, rest_s=train,
           ideal_speedup=s / max(sample, train), vllm_start_s=start_s, load=load(),
           repeats=args.repeats)  # fmt: skip


if __name__ == "__main__":
    main()
