"""What a run writes besides checkpoints: metrics.jsonl, samples.jsonl, the progress bar."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from ..types import Rollout

log = logging.getLogger("grpo_ar")


def jsonable(x: Any) -> Any:
    """A JSON value for `x`: non-finite floats become null, 1-element tensors floats."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool, type(None), list, dict)):
        return x
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return jsonable(float(x))
    shape = getattr(x, "shape", None)
    if shape is not None:  # tensors, arrays: a summary, not their repr
        return f"<{type(x).__name__} shape {list(shape)} {getattr(x, 'dtype', '')}>"
    return repr(x)


def append_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    line = json.dumps({k: jsonable(v) for k, v in metrics.items()}) + "\n"
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(line)  # one write, flushed on close, before the step's checkpoint


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's JSONL file. A cut last line (a kill or a full disk mid-write) is
    skipped with a warning; a bad line elsewhere is damage and raises naming the line."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines) and any(rest.strip() for rest in lines[i:]):
                raise DataError(
                    f"{path}:{i}: not valid JSON ({e.msg}); the file is damaged"
                ) from None
            log.warning("%s:%d: skipping a cut last line (the run was stopped mid-write)", path, i)
    return rows


def truncate_run_files(run_dir: Path, step: int) -> None:
    """Make metrics.jsonl, samples.jsonl and samples/ hold exactly what steps <= `step` wrote
    (a resumed run rewrites the rest): no repeated rows, no cut line. Atomic per file."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = run_dir / name
        if not path.exists():
            continue
        keep = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a cut line: its step is rewritten after the checkpoint
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                keep.append(line + "\n")
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, path)
    for folder in (run_dir / "samples").glob("step_*"):
        if folder.name[5:].isdigit() and int(folder.name[5:]) > step:
            shutil.rmtree(folder, ignore_errors=True)


def append_samples(
    run_dir: Path,
    rollout: Rollout,
    step: int,
    k: int,
    save: Callable | None = None,
    summarize: Callable[[Any], Any] | None = None,
) -> list[dict[str, Any]]:
    """The first `k` samples of a scored rollout (prompt, output, reward, each reward,
    advantage), appended to samples.jsonl and returned (the trackers' completion table).
    Outputs that are not JSON (images, clips) are written by `save(outputs, directory) ->
    paths` (an adapter's `save_samples`) under samples/step_N/ and referenced by path;
    otherwise each is shown as `summarize(output)` (an adapter's `summarize`: a short JSON
    value, never a repr)."""
    if k <= 0:
        return []
    k = min(k, len(rollout))
    outputs, result = rollout.extras["outputs"][:k], rollout.extras["reward"]
    shown: list[Any] = [summarize(o) for o in outputs] if summarize else list(outputs)
    if save is not None and not all(isinstance(o, str) for o in outputs):
        paths = save(outputs, run_dir / "samples" / f"step_{step:06d}")
        if paths is not None:  # None: the adapter writes no files (Adapter.save_samples)
            shown = [str(Path(p).relative_to(run_dir)) for p in paths]
    adv = rollout.data["adv"]
    if adv.dim() == 2:  # token advantages (per-turn credit): their mean over the model's tokens
        own = rollout.model_mask.to(adv)
        adv = (adv * own).sum(-1) / own.sum(-1).clamp(min=1)
    rows = []
    for i in range(k):
        used = [j for j in range(len(result.names)) if bool(result.used[i, j])]
        rows.append(
            {
                "step": step,
                "group": int(rollout.group_ids[i]),
                "prompt": jsonable(rollout.entries[i].prompt),
                "output": jsonable(shown[i]),
                "reward": jsonable(float(result.total[i])),
                "rewards": {
                    result.names[j]: jsonable(float(result.components[i, j])) for j in used
                },
                "advantage": float(adv[i]),
            }
        )
    with open(run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


class Progress:
    """The live reward, KL and tokens/s: a tqdm bar on a terminal; otherwise (a log file) one
    plain line every `every` steps instead of carriage-return updates."""

    def __init__(self, total: int, initial: int, every: int = 0, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.start = total, time.perf_counter()
        self.every = every or max(1, math.ceil(total / 20))
        self.bar = None
        isatty = getattr(self.stream, "isatty", None)
        if isatty is not None and isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc="grpo", dynamic_ncols=True, file=self.stream
            )

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        shown = {
            "reward": f"{metrics.get('reward/mean', math.nan):.3f}",
            "kl": f"{metrics['kl']:.3g}" if "kl" in metrics else None,
            "tok/s": f"{metrics.get('tokens_per_s', math.nan):.0f}",
        }
        shown = {k: v for k, v in shown.items() if v is not None}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(shown)
        elif step % self.every == 0 or step == self.total:
            took = time.perf_counter() - self.start
            fields = "  ".join(f"{k} {v}" for k, v in shown.items())
            print(
                f"grpo step {step}/{self.total}  {fields}  {took:.0f}s",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress(enabled: bool, total: int, initial: int, every: int = 0) -> Progress | None:
    return Progress(total, initial, every) if enabled else None
