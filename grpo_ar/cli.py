"""`grpo-ar train|eval|export|report`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config.run import Config, load_config
from .errors import CheckpointError, ConfigError, DataError, RanksLost, RunError, explain


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device={name} but no CUDA GPU is visible: use auto or cpu")
    return name


def build_model_and_adapter(cfg: Config) -> tuple[Any, Any]:
    """Load the configured model and its modality adapter: the builder `model.adapter` names in
    `grpo_ar.adapters.ADAPTERS`, given the adapter's own section ([image], [video], ...); with
    an [environment], the text adapter inside a `MultiTurnAdapter` with that environment."""
    import torch

    from .adapters.registry import ADAPTERS

    if not cfg.model.path:
        raise ConfigError(
            "model.path is empty: give a local folder or hub id of the model to train"
        )
    env = cfg.environment.build() if cfg.environment.enabled else None  # before the model
    build = ADAPTERS[cfg.model.adapter].build
    dtype = getattr(torch, cfg.model.dtype)
    model, adapter = build(cfg, cfg.adapter_section, _device(cfg.model.device), dtype)
    if env is not None:
        from .adapters.multiturn import MultiTurnAdapter

        adapter = MultiTurnAdapter(adapter, env)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model, adapter


def load_data(cfg: Config) -> tuple[list[Any], list[Any]]:
    from .io.data import load_entries

    if not cfg.data.train:
        raise ConfigError("data.train is empty: give a JSONL file or hf:NAME[:SPLIT]")
    kw = dict(prompt_field=cfg.data.prompt_field, default_rewards=cfg.data.rewards or None)
    train = load_entries(cfg.data.train, **kw)
    evals = load_entries(cfg.data.eval, **kw) if cfg.data.eval else []
    return train, evals


def load_model(cfg: Config) -> tuple[Any, Any]:
    """`build_model_and_adapter`, its loader errors (a missing or damaged folder, no tokenizer)
    turned into one message naming the configured paths."""
    from safetensors import SafetensorError

    try:
        return build_model_and_adapter(cfg)
    except (ConfigError, DataError):
        raise
    except (OSError, ValueError, TypeError, KeyError, ImportError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(
            f"cannot load the model of model.path={cfg.model.path!r} "
            f"({type(e).__name__}: {first}): give a local folder (or a cached hub id) holding "
            "config.json, the weights and the tokenizer files"
        ) from e


def train_config(args: argparse.Namespace) -> Config:
    """The validated config of `train`; `--resume DIR` runs in DIR whatever its config.yaml
    says (a copied run trains in the copy). Nothing is written here."""
    if not args.resume:
        cfg = load_config(args.config, args.set)
        return replace(cfg, log=replace(cfg.log, overwrite=True)) if args.overwrite else cfg
    if args.config:
        raise ConfigError(
            "--resume reads the run's own config.yaml; drop CONFIG and change keys with --set"
        )
    if args.overwrite:
        raise ConfigError("--resume continues a run, --overwrite deletes it: give one of them")
    run = Path(args.resume)
    if not (run / "config.yaml").is_file():
        raise CheckpointError(
            f"--resume {run}: not a run directory (no config.yaml): give the folder a "
            "`grpo-ar train` wrote"
        )
    cfg = load_config(run / "config.yaml", args.set)
    return replace(cfg, log=replace(cfg.log, run_dir=str(run)))


def cmd_train(args: argparse.Namespace) -> int:
    from .parallel.ddp import init_distributed, launched
    from .train.preflight import check_run_dir, preflight, refuse_held_run
    from .train.trainer import Trainer

    cfg = train_config(args)
    run = Path(cfg.log.run_dir)
    check_run_dir(run)
    if not (args.resume or cfg.log.overwrite):
        refuse_held_run(run)  # before anything loads; the trainer checks again at its start
    joined = False
    if launched():  # under torchrun: join the process group, this rank's device
        import torch.distributed as dist

        joined = not dist.is_initialized()
        device = init_distributed(cfg.model.device, cfg.trainer.dist_timeout_s)
        cfg = replace(cfg, model=replace(cfg.model, device=str(device)))
    main_rank = not launched() or int(os.environ.get("RANK", "0")) == 0
    try:
        train, evals = load_data(cfg)
        model, adapter = load_model(cfg)
        trainer = Trainer(cfg, model, adapter, train, evals)
        preflight(trainer)
        if args.resume:
            trainer.resume(run)
        trainer.train()
    except RuntimeError as e:  # gloo / nccl: a collective waited past the timeout
        text = str(e).lower()
        waited = any(w in text for w in ("timed out", "timeout", "timing out"))
        if isinstance(e, RunError) or not launched() or not waited:
            raise
        rank = os.environ.get("RANK", "0")
        joined = False  # a broken group is not torn down (see main)
        raise RanksLost(
            f"rank {rank}: waited trainer.dist_timeout_s={cfg.trainer.dist_timeout_s:g} s for "
            "the other ranks: one stopped, crashed or hangs (e.g. a reward that never "
            f"returns); see its log. Continue with `grpo-ar train --resume {run}`"
        ) from e
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()
    if main_rank:
        print(f"run directory: {cfg.log.run_dir}")
    return 0


def _checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint folder, or a run directory's latest checkpoint."""
    from .io.checkpoint import latest_checkpoint

    path = Path(path)
    path = latest_checkpoint(path) if (path / "checkpoints").is_dir() else path
    if not (path / "model.safetensors").is_file():
        raise CheckpointError(
            f"{path} is neither a checkpoint folder (no model.safetensors) nor a run directory "
            "(no checkpoints/): give one of them"
        )
    return path


def load_trained(cfg: Config, checkpoint: str | Path | None) -> tuple[Any, Any]:
    """(finetune, adapter) of the configured model, with a checkpoint's policy weights (the
    whole model or only the adapter, per `cfg.finetune`) when `checkpoint` is given."""
    from .finetune import build_finetune

    model, adapter = load_model(cfg)
    ft = build_finetune(model, cfg.finetune, need_reference=False, seed=cfg.trainer.seed)
    if checkpoint:
        ft.load_checkpoint_weights(_checkpoint_dir(checkpoint) / "model.safetensors")
    return ft, adapter


def cmd_eval(args: argparse.Namespace) -> int:
    from .train.preflight import check_prompts, check_vocabulary, vocab_size
    from .train.trainer import Trainer

    cfg = load_config(args.config, args.set)
    train, evals = load_data(cfg)
    ft, adapter = load_trained(cfg, args.checkpoint)
    check_vocabulary(ft.model, adapter)  # before any scoring, as `train` does
    check_prompts(
        adapter, evals or train, "data.eval" if evals else "data.train", vocab_size(ft.model)
    )
    cfg = replace(cfg, algorithm=replace(cfg.algorithm, beta=0.0))  # scoring needs no reference
    trainer = Trainer(cfg, ft.model, adapter, train, evals, finetune=ft)
    entries = evals or train
    out = trainer.evaluate(entries, greedy=True)
    if args.samples > 0:
        out.update(trainer.evaluate(entries, greedy=False, samples=args.samples))
    print(json.dumps(out, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A run's policy as a plain transformers folder: adapters merged into the base weights."""
    run = Path(args.run_dir)
    cfg = load_config(run / "config.yaml", args.set)
    ft, adapter = load_trained(cfg, args.checkpoint or run)
    out = Path(args.out_dir)
    ft.export(out)
    adapter.save_tokenizer(out)
    print(f"exported {cfg.finetune.method} policy of {run} to {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .io.run_files import read_jsonl

    for run in args.run_dir:
        if not (Path(run) / "metrics.jsonl").exists():
            raise CheckpointError(
                f"{Path(run) / 'metrics.jsonl'} does not exist: give a run directory "
                "`grpo-ar train` wrote"
            )
    rows = read_jsonl(Path(args.run_dir[0]) / "metrics.jsonl")
    keys = ["step", "reward/mean", "kl", "entropy", "completion/length_mean", "time/step"]
    keys += sorted({k for r in rows for k in r if k.startswith("eval/")})
    print("  ".join(f"{k:>14}" for k in keys))
    for r in rows:
        print(
            "  ".join(
                f"{r[k]:>14.4g}" if isinstance(r.get(k), (int, float)) else f"{'-':>14}"
                for k in keys
            )
        )
    if not args.text:
        from .io.report import write_report

        # stderr: stdout stays the table, for scripts that parse it
        print(f"wrote {write_report(args.run_dir, args.out)}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="grpo-ar", description="GRPO for autoregressive token models")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (or GRPO_AR_DEBUG=1)"
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train with GRPO", parents=[common])
    tr.add_argument("config", nargs="?", help="TOML or YAML config file")
    tr.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    tr.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint"
    )
    tr.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a run directory that holds a run (deletes its metrics, samples, "
        "checkpoints)",
    )
    ev = sub.add_parser("eval", help="score a model on held-out entries", parents=[common])
    ev.add_argument("config")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument(
        "--samples", type=int, default=0, help="also sample this many completions per prompt"
    )
    ev.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="checkpoint folder, or run directory (its latest), to score",
    )
    ex = sub.add_parser(
        "export", help="write a run's policy as a plain transformers model", parents=[common]
    )
    ex.add_argument("run_dir", help="run directory (its config.yaml and checkpoints)")
    ex.add_argument("out_dir", help="folder for save_pretrained (adapters merged)")
    ex.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ex.add_argument("--checkpoint", metavar="DIR", help="a checkpoint folder (default: latest)")
    rp = sub.add_parser(
        "report", help="a run's metrics table, and report.html with its curves", parents=[common]
    )
    rp.add_argument("run_dir", nargs="+", help="run directories (several: overlaid curves)")
    rp.add_argument("--out", help="folder for report.html and its PNGs (default RUN/report)")
    rp.add_argument("--text", action="store_true", help="only print the first run's table")
    vs = sub.add_parser("vllm-serve", help="serve rollouts from a vLLM engine", add_help=False)
    vs.add_argument("rest", nargs=argparse.REMAINDER, help="MODEL [--port P] ... (see --help)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["vllm-serve"]:  # its own parser (grpo_ar/generation/vllm_server.py)
        from .generation.vllm_server import main as serve

        return serve(argv[1:])
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "train" and not (args.config or args.resume):
        p.error("train needs a CONFIG file or --resume RUN_DIR")
    debug = args.debug or os.environ.get("GRPO_AR_DEBUG", "") not in ("", "0")
    try:
        cmds = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "report": cmd_report}
        return cmds[args.cmd](args)
    except Exception as e:  # one line for the user; the traceback only when asked
        code, msg = explain(e)
        if debug:
            traceback.print_exc()
        print(f"grpo-ar: error: {msg}", file=sys.stderr)
        if isinstance(e, RanksLost):
            # Releasing the trainer would run gloo's destructor, which joins a worker thread
            # that waits for the GIL the destructor holds (a deadlock seen in one run of two
            # under load): exit now; torchrun then stops the other ranks.
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(code)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
