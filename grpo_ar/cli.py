"""`grpo-ar train|eval|export|report`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config.run import Config, load_config
from .errors import ConfigError, DataError


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def build_model_and_adapter(cfg: Config) -> tuple[Any, Any]:
    """Load the configured model and its modality adapter."""
    import torch

    if not cfg.model.path:
        raise ConfigError(
            "model.path is empty: give a local folder or hub id of the model to train"
        )
    dtype = getattr(torch, cfg.model.dtype)
    if cfg.model.adapter == "image":
        return _build_code_grid(cfg, dtype, "image")
    if cfg.model.adapter == "video":
        return _build_code_grid(cfg, dtype, "video")
    if cfg.model.adapter != "text":
        raise ConfigError(f"model.adapter={cfg.model.adapter!r}: use text, image or video")
    from .adapters.text import TextAdapter, load_text_model

    model, tok = load_text_model(cfg.model.path, dtype=dtype, device=_device(cfg.model.device))
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    adapter = TextAdapter(
        tok,
        cfg.sampling,
        chat_template=cfg.model.chat_template,
        max_prompt_tokens=cfg.model.max_prompt_tokens,
        system_prompt=cfg.model.system_prompt,
    )
    return model, adapter


def _build_code_grid(cfg: Config, dtype: Any, kind: str) -> tuple[Any, Any]:
    """An AR image / video model: the LM from model.path, the VQ tokenizer and condition from
    the [image] / [video] section."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .adapters.image import ClassCondition, ImageAdapter, TextCondition
    from .adapters.video import VideoAdapter
    from .adapters.vq import load_vq_decoder

    sec, device = getattr(cfg, kind), _device(cfg.model.device)
    if not sec.decoder_path:
        raise ConfigError(f"{kind}.decoder_path is empty: give the folder of the VQ tokenizer")
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=dtype).to(device)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    kw: dict[str, Any] = {"subfolder": sec.decoder_subfolder} if sec.decoder_subfolder else {}
    if kind == "video":
        kw["per_frame"] = sec.frame_wise
    decoder = load_vq_decoder(sec.decoder, sec.decoder_path, device=device, **kw)  # fp32 decode
    if sec.condition == "class":
        cond = ClassCondition(
            sec.class_offset, sec.num_classes, sec.bos_token_id, sec.null_class_token
        )
    else:
        tok = AutoTokenizer.from_pretrained(cfg.model.path)
        cond = TextCondition(tok, sec.prompt_template, sec.uncond, sec.negative_prompt)
    cls = ImageAdapter if kind == "image" else VideoAdapter
    prefix = sec.image_prefix_ids if kind == "image" else sec.video_prefix_ids
    adapter = cls(
        decoder, cfg.sampling, sec.grid, sec.code_offset, cond, prefix,
        cfg_train=sec.cfg_train, detach_uncond=sec.detach_uncond, output=sec.output,
        decode_batch_size=sec.decode_batch_size, eol_token_id=sec.eol_token_id,
        eof_token_id=sec.eof_token_id,
    )  # fmt: skip
    return model, adapter


def load_data(cfg: Config) -> tuple[list[Any], list[Any]]:
    from .io.data import load_entries

    if not cfg.data.train:
        raise ConfigError("data.train is empty: give a JSONL file or hf:NAME[:SPLIT]")
    kw = dict(prompt_field=cfg.data.prompt_field, default_rewards=cfg.data.rewards or None)
    train = load_entries(cfg.data.train, **kw)
    evals = load_entries(cfg.data.eval, **kw) if cfg.data.eval else []
    return train, evals


def cmd_train(args: argparse.Namespace) -> int:
    from .parallel.ddp import init_distributed, launched
    from .train.trainer import Trainer

    if args.resume:
        if args.config:
            raise ConfigError(
                "--resume reads the run's own config.yaml; drop CONFIG and change keys with --set"
            )
        cfg = load_config(Path(args.resume) / "config.yaml", args.set)
    else:
        cfg = load_config(args.config, args.set)
    joined = False
    if launched():  # under torchrun: join the process group, this rank's device
        import torch.distributed as dist

        joined = not dist.is_initialized()
        device = init_distributed(cfg.model.device)
        cfg = replace(cfg, model=replace(cfg.model, device=str(device)))
    try:
        train, evals = load_data(cfg)
        model, adapter = build_model_and_adapter(cfg)
        trainer = Trainer(cfg, model, adapter, train, evals)
        if args.resume:
            trainer.resume(args.resume)
        trainer.train()
    finally:
        if joined:
            import torch.distributed as dist

            dist.destroy_process_group()
    if not launched() or int(os.environ.get("RANK", "0")) == 0:
        print(f"run directory: {cfg.log.run_dir}")
    return 0


def _checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint folder, or a run directory's latest checkpoint."""
    from .io.checkpoint import latest_checkpoint

    path = Path(path)
    return latest_checkpoint(path) if (path / "checkpoints").is_dir() else path


def load_trained(cfg: Config, checkpoint: str | Path | None) -> tuple[Any, Any]:
    """(finetune, adapter) of the configured model, with a checkpoint's policy weights (the
    whole model or only the adapter, per `cfg.finetune`) when `checkpoint` is given."""
    from .finetune import build_finetune

    model, adapter = build_model_and_adapter(cfg)
    ft = build_finetune(model, cfg.finetune, need_reference=False, seed=cfg.trainer.seed)
    if checkpoint:
        ft.load_checkpoint_weights(_checkpoint_dir(checkpoint) / "model.safetensors")
    return ft, adapter


def cmd_eval(args: argparse.Namespace) -> int:
    from .train.trainer import Trainer

    cfg = load_config(args.config, args.set)
    train, evals = load_data(cfg)
    ft, adapter = load_trained(cfg, args.checkpoint)
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
    tokenizer = getattr(adapter, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    print(f"exported {cfg.finetune.method} policy of {run} to {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    path = Path(args.run_dir) / "metrics.jsonl"
    if not path.exists():
        print(f"{path} does not exist", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
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
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="grpo-ar", description="GRPO for autoregressive token models")
    sub = p.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train with GRPO")
    tr.add_argument("config", nargs="?", help="TOML or YAML config file")
    tr.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    tr.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint"
    )
    ev = sub.add_parser("eval", help="score a model on held-out entries")
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
    ex = sub.add_parser("export", help="write a run's policy as a plain transformers model")
    ex.add_argument("run_dir", help="run directory (its config.yaml and checkpoints)")
    ex.add_argument("out_dir", help="folder for save_pretrained (adapters merged)")
    ex.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ex.add_argument("--checkpoint", metavar="DIR", help="a checkpoint folder (default: latest)")
    rp = sub.add_parser("report", help="summarise a run's metrics")
    rp.add_argument("run_dir")
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
    try:
        cmds = {"train": cmd_train, "eval": cmd_eval, "export": cmd_export, "report": cmd_report}
        return cmds[args.cmd](args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
