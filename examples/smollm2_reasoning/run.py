"""SmolLM2-135M-Instruct, GRPO on held-out arithmetic: training seeds × evaluation seeds (issue 23's
protocol) and the held-out greedy curve of every run, on CPU.

    python examples/smollm2_reasoning/prepare.py          # model + data, once
    python examples/smollm2_reasoning/run.py --jobs 2     # the measured run: README.md

1. Held-out: every row of data.eval (200 reasoning-gym problems, none in train). Greedy accuracy
   draws nothing, so it is measured once per model; sampled accuracy (`--eval-samples` answers
   per problem at the training temperature) once per evaluation seed, from generators that no
   training run draws from (checked before anything runs).
2. Measure the start model, then train every training seed with config.toml (`--set` overrides
   keys) from the same start, `--jobs` runs at a time, each in its own process with
   `--threads` torch threads; the held-out greedy curve comes from the run's own evaluation
   (`trainer.eval_every`) in seed<N>/metrics.jsonl. Measure each trained model again.
3. Print before -> after per metric over the (training seed, evaluation seed) cells, the greedy
   gain per training seed with its wall time, and write <log.run_dir>/results.json.

`--reuse` keeps the finished runs of an earlier call with the same config (an interrupted grid,
or other evaluation seeds) and measures their final checkpoints instead of training again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # ar_common

from ar_common.runs import commit  # noqa: E402
from ar_common.seeds import add_seed_options, check_eval_seeds, pm, stats, summarise, table  # noqa: E402

from grpo_ar.cli import load_data, load_model, load_trained  # noqa: E402
from grpo_ar.config import load_config  # noqa: E402
from grpo_ar.config.run import config_to_dict  # noqa: E402
from grpo_ar.rewards import build_rewards  # noqa: E402
from grpo_ar.train.evaluation import eval_generator_seeds, evaluate_rewards  # noqa: E402
from grpo_ar.train.trainer import Trainer  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "config.toml"
METRICS = {"numeric_answer": "accuracy", "regex_format": "format", "reward": "reward"}
LABELS = {"accuracy": "held-out accuracy, sampled", "format": "answer tag, sampled"}
TARGET = {"gain": 0.25, "minutes": 60.0}  # issue 24 item 8: greedy held-out, per run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(CONFIG), help="the run's config (default config.toml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override (config.toml keys)")  # fmt: skip
    ap.add_argument("--eval-samples", type=int, default=1,
                    help="sampled answers per held-out problem at each evaluation seed")  # fmt: skip
    ap.add_argument("--eval-batch", type=int, default=100, help="held-out prompts per batch")
    ap.add_argument("--jobs", type=int, default=1,
                    help="training runs at once, each in its own process (1: in this one)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of each run (and of the evaluation before training)")  # fmt: skip
    ap.add_argument("--reuse", action="store_true",
                    help="do not train a seed again whose run with the same config finished "
                    "(seed<N>/result.json and its final checkpoint): measure that checkpoint")  # fmt: skip
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    add_seed_options(ap)
    args = ap.parse_args(argv)
    if args.jobs < 1 or args.threads < 1 or args.eval_samples < 1 or args.eval_batch < 1:
        ap.error("--jobs, --threads, --eval-samples and --eval-batch must be >= 1")
    if len(set(args.seeds)) < len(args.seeds) or len(set(args.eval_seeds)) < len(args.eval_seeds):
        ap.error("--seeds and --eval-seeds must not repeat a seed (one run folder per seed)")
    return args


def measure(
    model: Any, adapter: Any, rewards: Any, heldout: list, args: argparse.Namespace
) -> dict:
    """{"greedy": metrics, "sampled": {eval seed: metrics}} on every held-out row; metrics are
    accuracy, format and reward (the config's weighted sum)."""

    def named(out: dict[str, float], mode: str) -> dict[str, float]:
        return {short: out[f"eval/{mode}/{key}"] for key, short in METRICS.items()}

    kw = {"batch_size": args.eval_batch}
    rows: list[dict[str, float]] = []
    greedy = evaluate_rewards(model, adapter, rewards, heldout, greedy=True, seed=0,
                              per_output=rows, **kw)  # fmt: skip
    kinds: dict[str, list[float]] = {}
    for entry, row in zip(heldout, rows, strict=True):
        kinds.setdefault(kind(entry.metadata.get("question", "")), []).append(row["numeric_answer"])
    sampled = {
        e: named(evaluate_rewards(model, adapter, rewards, heldout, greedy=False,
                                  samples=args.eval_samples, seed=e, **kw), "sampled")
        for e in args.eval_seeds
    }  # fmt: skip
    by_kind = {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(kinds.items())}
    return {"greedy": named(greedy, "greedy"), "greedy_by_kind": by_kind, "sampled": sampled}


def kind(question: str) -> str:
    """The skill a `Calculate a ± b.` problem needs: "a+b", "a+b carry", "a-b", "a-b borrow"
    (a units borrow, result >= 0) or "a-b < 0" (a negative answer); "other" for other tasks."""
    m = re.fullmatch(r"Calculate (\d+) ([+-]) (\d+)\.", question)
    if m is None:
        return "other"
    a, op, b = int(m[1]), m[2], int(m[3])
    if op == "+":
        return "a+b carry" if a % 10 + b % 10 >= 10 else "a+b"
    if a < b:
        return "a-b < 0"
    return "a-b borrow" if a % 10 < b % 10 else "a-b"


def seed_config(args: argparse.Namespace, seed: int) -> Any:
    cfg = load_config(args.config, args.set)
    run = Path(cfg.log.run_dir) / f"seed{seed}"
    return replace(cfg, trainer=replace(cfg.trainer, seed=seed),
                   log=replace(cfg.log, run_dir=str(run), overwrite=True))  # fmt: skip


def train_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """One training run from the start model; its held-out measurement, greedy curve and
    timings go to seed<N>/result.json (read back by the parent with --jobs > 1)."""
    import torch

    torch.set_num_threads(args.threads)
    cfg = seed_config(args, seed)
    train, heldout = load_data(cfg)
    model, adapter = load_model(cfg)
    trainer = Trainer(cfg, model, adapter, train, heldout)
    t0 = time.perf_counter()
    history = trainer.train()
    train_s = time.perf_counter() - t0
    after = measure(trainer.model, adapter, trainer.rewards, heldout, args)
    rows = [
        json.loads(x)
        for x in (Path(cfg.log.run_dir) / "metrics.jsonl").read_text().split("\n")
        if x
    ]
    curve = [{"step": r["step"], "accuracy": r["eval/greedy/numeric_answer"],
              "format": r["eval/greedy/regex_format"]} for r in rows if "eval/greedy/numeric_answer" in r]  # fmt: skip
    result = {
        "seed": seed, "after": after, "curve": curve, "train_s": train_s,
        "eval_s": time.perf_counter() - t0 - train_s, "steps": len(history),
        "eval_rows_in_curve": min(cfg.data.eval_size or len(heldout), len(heldout)),
        "train_reward": [round(h["reward/mean"], 4) for h in history],
        "kl_last": history[-1].get("kl", 0.0) if history else 0.0,
        "load_end": os.getloadavg()[0], "threads": args.threads, "eval": eval_settings(args),
    }  # fmt: skip
    write_json(Path(cfg.log.run_dir) / "result.json", result)
    return json.loads(json.dumps(result))  # as a worker's reads back: eval seeds as str keys


def comparable(cfg: Any) -> dict[str, Any]:
    """A config as a dict, without the sampling ids the trainer fills in from the tokenizer."""
    out = config_to_dict(cfg)
    for key in ("eos_token_ids", "pad_token_id"):
        out["sampling"].pop(key, None)
    return out


def eval_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"seeds": args.eval_seeds, "samples": args.eval_samples, "batch": args.eval_batch}


def reuse_seed(args: argparse.Namespace, seed: int) -> dict[str, Any] | None:
    """--reuse: the finished run of `seed` (its result.json and final checkpoint) with its
    training record; its measurement too when it was made with this call's evaluation
    settings, else its final checkpoint is measured (and result.json updated). None when it
    has not finished; SystemExit when it ran another config."""
    cfg = seed_config(args, seed)
    run = Path(cfg.log.run_dir)
    last = run / "checkpoints" / f"step_{cfg.trainer.steps:06d}"
    if not ((run / "result.json").is_file() and (last / "model.safetensors").is_file()):
        return None
    if comparable(load_config(run / "config.yaml")) != comparable(cfg):
        raise SystemExit(f"--reuse: {run} was trained with another config than this call's: "
                         "remove it, or drop --reuse to train it again")  # fmt: skip
    result = json.loads((run / "result.json").read_text())
    if result.get("eval") == eval_settings(args):
        print(f"training seed {seed}: reused {run} as measured", flush=True)
        return result
    ft, adapter = load_trained(cfg, last)
    heldout = load_data(cfg)[1]
    after = measure(ft.model, adapter, build_rewards(cfg.data.reward_setup, heldout), heldout, args)
    result.update(after=after, eval=eval_settings(args), measured_from=str(last))
    write_json(run / "result.json", result)
    print(f"training seed {seed}: reused {run}, measured {last}", flush=True)
    return json.loads(json.dumps(result))


def write_json(path: Path, data: Any) -> None:
    """`data` as JSON at `path`, written whole or not at all (a temporary file, then renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def spawn(args: argparse.Namespace, argv: list[str], seed: int) -> subprocess.Popen:
    """This script as a worker for one training seed, its output in seed<N>/worker.log."""
    run = Path(seed_config(args, seed).log.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    skip = {"--seeds", "--jobs", "--reuse"}
    rest, i = [], 0
    while i < len(argv):  # drop the parent's --seeds / --jobs (and their values)
        if argv[i] in skip:
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                i += 1
            continue
        rest.append(argv[i])
        i += 1
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    log = open(run / "worker.log", "w")  # noqa: SIM115 (closed by the parent after wait)
    cmd = [sys.executable, __file__, *rest, "--worker", "--jobs", "1", "--seeds", str(seed)]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def train_all(args: argparse.Namespace, argv: list[str]) -> dict[int, dict[str, Any]]:
    """Every training seed: in this process one after another (--jobs 1), else --jobs worker
    processes at a time. A worker that fails stops the run with its log's path."""
    done: dict[int, dict[str, Any]] = {}
    for t in args.seeds if args.reuse else ():
        if (old := reuse_seed(args, t)) is not None:
            done[t] = old
    pending = [t for t in args.seeds if t not in done]
    if args.jobs == 1:
        done.update({t: train_seed(args, t) for t in pending})
        return {t: done[t] for t in args.seeds}
    running: dict[int, subprocess.Popen] = {}
    while pending or running:
        while pending and len(running) < args.jobs:
            t = pending.pop(0)
            running[t] = spawn(args, argv, t)
        time.sleep(2)
        for t, proc in list(running.items()):
            if proc.poll() is None:
                continue
            del running[t]
            run = Path(seed_config(args, t).log.run_dir)
            if proc.returncode != 0:
                for other in running.values():
                    other.kill()
                raise SystemExit(f"training seed {t} failed (exit {proc.returncode}): see "
                                 f"{run / 'worker.log'}")  # fmt: skip
            done[t] = json.loads((run / "result.json").read_text())
            print(f"training seed {t} done: {summary_line(done[t])}", flush=True)
    return {t: done[t] for t in args.seeds}


def summary_line(r: dict[str, Any]) -> str:
    curve = " ".join(f"{c['step']}:{c['accuracy']:.3f}" for c in r["curve"])
    return (f"{r['steps']} steps in {r['train_s'] / 60:.1f} min, greedy held-out curve "
            f"(step:accuracy, {r['eval_rows_in_curve']} rows) {curve}")  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    if args.worker:
        return train_seed(args, args.seeds[0])
    for path in (cfg.model.path, cfg.data.train, cfg.data.eval):
        if not path or not Path(path).exists():
            raise SystemExit(f"{path or 'data.eval'} is missing: run "
                             "examples/smollm2_reasoning/prepare.py first")  # fmt: skip
    heldout = load_data(cfg)[1]
    draws = {e: eval_generator_seeds(e, len(heldout), args.eval_batch) for e in args.eval_seeds}
    check_eval_seeds(args.eval_seeds, args.seeds, cfg.trainer.steps,
                     cfg.algorithm.dynamic_sampling_max_rounds, draws=draws.__getitem__)  # fmt: skip
    import torch

    t0, load0 = time.perf_counter(), os.getloadavg()
    torch.set_num_threads(min(args.threads * args.jobs, os.cpu_count() or 1))
    model, adapter = load_model(cfg)
    rewards = build_rewards(cfg.data.reward_setup, heldout)
    before = json.loads(json.dumps(measure(model, adapter, rewards, heldout, args)))
    del model
    print(f"before GRPO: greedy {before['greedy']}; sampled {before['sampled']}", flush=True)
    runs = train_all(args, argv)
    cells = [{"train_seed": t, "eval_seed": e, "before": before["sampled"][str(e)],
              "after": r["after"]["sampled"][str(e)]} for t, r in runs.items() for e in args.eval_seeds]  # fmt: skip
    greedy = {k: {"before": before["greedy"][k],
                  "after": stats([r["after"]["greedy"][k] for r in runs.values()])}
              for k in ("accuracy", "format")}  # fmt: skip
    result = {
        "protocol": {"heldout_rows": len(heldout), "data_eval": cfg.data.eval,
                     "samples_per_problem": args.eval_samples,
                     "temperature": cfg.sampling.temperature, "train_seeds": args.seeds,
                     "eval_seeds": args.eval_seeds, "eval_draws": {str(e): d for e, d in draws.items()},
                     "greedy": "seed-independent: measured once per model", "config": args.set,
                     "jobs": args.jobs, "threads": args.threads},
        "before": before, "cells": cells, "summary": summarise(cells, list(LABELS)),
        "greedy": greedy, "runs": list(runs.values()), "target": TARGET,
        "seconds": {"total": time.perf_counter() - t0},
        "loadavg_1min": {"start": load0[0], "end": os.getloadavg()[0]},
        "commit": commit(), "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    out = Path(cfg.log.run_dir) / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(report(result) + f"\nwrote {out}", flush=True)
    return result


def report(result: dict[str, Any]) -> str:
    """The README's figures: greedy gain and wall time per training seed against the target,
    the greedy curves, and sampled metrics over the (training, evaluation) seed cells."""
    g, p, t = result["greedy"]["accuracy"], result["protocol"], result["target"]
    lines = [f"held-out {p['heldout_rows']} problems; training seeds {p['train_seeds']} x "
             f"evaluation seeds {p['eval_seeds']}; {p['jobs']} run(s) at a time, "
             f"{p['threads']} thread(s) each"]  # fmt: skip
    for r in result["runs"]:
        gain = r["after"]["greedy"]["accuracy"] - g["before"]
        ok = gain >= t["gain"] and r["train_s"] / 60 <= t["minutes"]
        lines.append(f"training seed {r['seed']}: greedy {g['before']:.3f} -> "
                     f"{r['after']['greedy']['accuracy']:.3f} ({gain:+.3f}) in "
                     f"{r['train_s'] / 60:.1f} min [target +{t['gain']:.2f} in <= "
                     f"{t['minutes']:.0f} min: {'met' if ok else 'missed'}]; {summary_line(r)}")  # fmt: skip
    lines.append(f"greedy accuracy after, over training seeds: {pm(g['after'])}")
    before = result["before"]["greedy_by_kind"]
    after = {k: stats([r["after"]["greedy_by_kind"][k]["accuracy"] for r in result["runs"]])
             for k in before}  # fmt: skip
    lines.append("greedy accuracy by problem kind (held-out rows), before -> after (mean over "
                 "training seeds): " + "; ".join(
                     f"{k} (n={v['n']}) {v['accuracy']:.3f} -> {after[k]['mean']:.3f}"
                     for k, v in before.items()))  # fmt: skip
    lines.append(f"sampled ({p['samples_per_problem']} per problem, T {p['temperature']}), "
                 "mean ± std (min..max) over the cells:")  # fmt: skip
    lines.append(table(result["summary"], LABELS))
    load = result["loadavg_1min"]
    lines.append(f"commit {result['commit']}; total {result['seconds']['total'] / 60:.1f} min; "
                 f"load {load['start']:.1f} -> {load['end']:.1f}")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
