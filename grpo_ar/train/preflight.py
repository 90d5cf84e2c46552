"""Start-up checks: everything about a run that can be known before its first step, refused
with one message that says what to change (a run must never fail at step 40 for a row it
could have read at step 0)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DataError
from ..types import Entry

RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl", "samples", "checkpoints")


def check_run_dir(run_dir: str | Path) -> None:
    """The run directory is (or can be made) a writable folder; nothing of a run is written."""
    run = Path(run_dir)
    if run.exists() and not run.is_dir():
        raise ConfigError(f"log.run_dir={run} is a file, not a folder: choose another log.run_dir")
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / f".grpo_ar_write_test.{os.getpid()}"  # one per rank: no race
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"log.run_dir={run} is not writable ({e.strerror}): fix its permissions or choose "
            "another log.run_dir"
        ) from None


def run_contents(run_dir: str | Path) -> list[str]:
    """The files of a run that `run_dir` holds (empty: no run there)."""
    return [name for name in RUN_FILES if (Path(run_dir) / name).exists()]


def refuse_held_run(run_dir: str | Path) -> None:
    """A new run must not append its rows to the files of an earlier run in the same folder.
    A lone config.yaml (a run that failed before its first row, e.g. a tracker that could not
    start) holds nothing to append to: it is rewritten."""
    held = run_contents(run_dir)
    if set(held) - {"config.yaml"}:
        raise ConfigError(
            f"log.run_dir={run_dir} holds a run ({', '.join(held)}): continue it with "
            f"`grpo-ar train --resume {run_dir}` (or Trainer.resume() before train()), start "
            "over with --overwrite / log.overwrite=true (deletes its metrics, samples and "
            "checkpoints), or choose another log.run_dir"
        )


def clear_run(run_dir: str | Path) -> None:
    """`--overwrite`: remove the files a run writes, and nothing else the folder holds."""
    for name in run_contents(run_dir):
        path = Path(run_dir) / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def checkpoint_bytes(tr: Any) -> int:
    """A generous estimate of one checkpoint's size: the policy (and a full reference copy),
    plus two fp32 optimizer moments per trainable parameter (AdamW)."""
    seen, weights, trainable = set(), 0, 0
    for p in tr.model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        weights += p.numel() * p.element_size()
        trainable += p.numel() if p.requires_grad else 0
    full_reference = tr.reference is not None and tr.cfg.finetune.method == "full"
    return weights * (2 if full_reference else 1) + trainable * 8


def check_free_space(run_dir: str | Path, need: int) -> None:
    free = shutil.disk_usage(run_dir).free
    if free < need * 1.1:
        raise ConfigError(
            f"log.run_dir={run_dir}: {free / 2**20:.0f} MiB free, a checkpoint needs about "
            f"{need / 2**20:.0f} MiB: free space or choose another log.run_dir"
        )


def vocab_size(model: torch.nn.Module) -> int | None:
    get_head: Any = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


def check_vocabulary(model: torch.nn.Module, adapter: Any) -> None:
    """Tokenizer, special ids and sampling ranges fit the model's output layer."""
    v = vocab_size(model)
    if v is None:
        return
    tok = getattr(adapter, "tokenizer", None)
    if tok is not None and len(tok) > v:
        raise ConfigError(
            f"the tokenizer has {len(tok)} tokens but the model's output layer only {v}: "
            "model.path must hold the tokenizer the model was trained with"
        )
    s = adapter.sampling
    for name, ids in (("sampling.eos_token_ids", s.eos_token_ids), ("pad", (s.pad_token_id,))):
        bad = [i for i in ids if not 0 <= i < v]
        if bad:
            raise ConfigError(f"{name} {bad} outside the model's vocabulary [0, {v}): fix them")
    ranges = [(lo, hi) for lo, hi in s.allowed_ranges] + [r[1:] for r in s.position_ranges]
    bad = [r for r in ranges if r[1] > v]
    if bad:
        raise ConfigError(
            f"sampling ranges {bad} reach past the model's vocabulary of {v} tokens: keep hi <= {v}"
        )


def check_prompts(adapter: Any, entries: Sequence[Entry], key: str, vocab: int | None) -> None:
    """Every prompt encodes (type, length against model.max_prompt_tokens) to ids the model
    has; encoded in chunks, and one by one only in a chunk that fails, to name the row."""
    chat = hasattr(adapter, "prompt_text")  # a text adapter: strings or chat message lists
    for i, e in enumerate(entries):
        ok = isinstance(e.prompt, str) or (
            isinstance(e.prompt, list) and all(isinstance(m, dict) for m in e.prompt)
        )
        if chat and not ok:
            raise DataError(
                f"{key} row {i + 1}: the prompt is {type(e.prompt).__name__} {e.prompt!r}; "
                "give a string or a list of chat messages"
            )
    chunk = 256
    for first in range(0, len(entries), chunk):
        part = list(entries[first : first + chunk])
        try:
            ids = adapter.encode(part).input_ids
        except (ValueError, TypeError, KeyError) as e:
            for j, entry in enumerate(part):  # find the row
                try:
                    adapter.encode([entry])
                except (ValueError, TypeError, KeyError) as e1:
                    raise DataError(f"{key} row {first + j + 1}: {e1}") from None
            raise DataError(f"{key} rows {first + 1}-{first + len(part)}: {e}") from None
        if vocab is not None and ids.numel() and int(ids.max()) >= vocab:
            row = first + int((ids >= vocab).any(dim=1).nonzero()[0, 0]) + 1
            raise DataError(
                f"{key} row {row}: its prompt encodes to token id {int(ids.max())}, outside the "
                f"model's vocabulary of {vocab}: the tokenizer does not match the model"
            )


def preflight(tr: Any) -> None:
    """All start-up checks of a built Trainer (the CLI runs them before resuming or step 1)."""
    check_vocabulary(tr.model, tr.adapter)
    v = vocab_size(tr.model)
    check_prompts(tr.adapter, tr.train_entries, "data.train", v)
    if tr.eval_entries:
        check_prompts(tr.adapter, tr.eval_entries, "data.eval", v)
    if tr.dist.is_main:
        check_free_space(tr.run_dir, checkpoint_bytes(tr))
