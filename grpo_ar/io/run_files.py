"""What a run writes besides checkpoints: metrics.jsonl, samples.jsonl, the progress bar."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..types import Rollout


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
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({k: jsonable(v) for k, v in metrics.items()}) + "\n")


def append_samples(
    run_dir: Path, rollout: Rollout, step: int, k: int, save: Callable | None = None
) -> None:
    """The first `k` samples of a scored rollout (prompt, output, reward, advantage). Outputs
    that are not JSON (images, clips) are written by `save(outputs, directory) -> paths` (an
    adapter's `save_samples`) under samples/step_N/ and referenced by path."""
    if k <= 0:
        return
    k = min(k, len(rollout))
    outputs, result = rollout.extras["outputs"][:k], rollout.extras["reward"]
    shown: list[Any] = list(outputs)
    if save is not None and not all(isinstance(o, str) for o in outputs):
        paths = save(outputs, run_dir / "samples" / f"step_{step:06d}")
        if paths is not None:  # None: the adapter writes no files (Adapter.save_samples)
            shown = [str(Path(p).relative_to(run_dir)) for p in paths]
    with open(run_dir / "samples.jsonl", "a", encoding="utf-8") as f:
        for i in range(k):
            row = {
                "step": step,
                "group": int(rollout.group_ids[i]),
                "prompt": jsonable(rollout.entries[i].prompt),
                "output": jsonable(shown[i]),
                "reward": jsonable(float(result.total[i])),
                "advantage": float(rollout.data["adv"][i]),
            }
            f.write(json.dumps(row) + "\n")


def progress(enabled: bool, total: int, initial: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="grpo", dynamic_ncols=True)
