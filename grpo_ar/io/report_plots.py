"""The report's PNGs (matplotlib, Agg): curves of one or several runs overlaid, and sample grids
of image and video runs over steps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# (file stem, title, y label, metric keys or key prefixes ending in "/*", rolling mean)
PANELS: list[tuple[str, str, str, list[str], bool]] = [
    ("reward", "Reward (mean over the batch)", "reward", ["reward/mean"], True),
    ("rewards", "Each reward's mean", "reward", ["reward/*/mean"], True),
    ("eval", "Held-out evaluation", "reward", ["eval/*"], False),
    ("kl", "KL to the reference", "KL", ["kl"], True),
    ("entropy", "Token entropy", "nats", ["entropy"], True),
    ("length", "Completion length", "tokens", ["completion/length_mean", "completion/length_max"], False),
    ("truncation", "Truncated completions", "fraction", ["completion/truncated"], False),
    ("clip", "Clipped-ratio fractions", "fraction of tokens", ["clip/low", "clip/high"], False),
    ("time", "Time per phase", "seconds", ["time/*"], False),
    ("throughput", "Sampling throughput", "tokens / s", ["tokens_per_s"], False),
]  # fmt: skip


@dataclass
class Run:
    """One run directory's files, as the report reads them."""

    name: str
    path: Path
    metrics: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    config: str = ""


def series(run: Run, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of a metric, nulls and non-numbers skipped; a step's last value wins."""
    by_step: dict[int, float] = {}
    for row in run.metrics:
        v, step = row.get(key), row.get("step")
        if isinstance(v, (int, float)) and isinstance(step, (int, float)) and math.isfinite(v):
            by_step[int(step)] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def panel_keys(runs: Sequence[Run], patterns: Sequence[str]) -> list[str]:
    """The metric keys of `runs` that `patterns` name ("a/*/b": one path segment or more)."""
    present = sorted({k for r in runs for row in r.metrics for k in row})
    keys: list[str] = []
    for p in patterns:
        if "*" not in p:
            keys += [p] if p in present else []
            continue
        head, _, tail = p.partition("*")
        keys += [
            k
            for k in present
            if k.startswith(head) and k.endswith(tail) and len(k) > len(head) + len(tail)
        ]
    return list(dict.fromkeys(keys))


def rolling(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_panel(runs: Sequence[Run], panel: tuple, out_dir: Path) -> Path | None:
    """One PNG of a panel's keys for every run (colour: key, line style: run); None if empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem, title, ylabel, patterns, smooth = panel
    keys = panel_keys(runs, patterns)
    lines = [(r, k, *series(r, k)) for r in runs for k in keys]
    lines = [x for x in lines if x[2]]
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    styles = ["-", "--", ":", "-."]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for run, key, steps, values in lines:
        ri, ki = runs.index(run), keys.index(key)
        label = key if len(runs) == 1 else f"{run.name}: {key}"
        colour = colours[(ki if len(runs) == 1 or len(keys) > 1 else ri) % len(colours)]
        style = styles[ri % len(styles)]
        if smooth and len(values) > 3:
            window = max(2, len(values) // 10)
            ax.plot(steps, values, style, color=colour, alpha=0.3, linewidth=1)
            ax.plot(
                steps,
                rolling(values, window),
                style,
                color=colour,
                label=f"{label} (rolling {window})",
            )
        else:
            ax.plot(
                steps,
                values,
                style,
                color=colour,
                marker="o" if len(values) < 30 else None,
                markersize=3,
                label=label,
            )
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = out_dir / f"{stem}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def media_rows(run: Run) -> dict[int, list[dict[str, Any]]]:
    """step -> samples whose output is an image (.png) or clip (.gif) file of the run."""
    out: dict[int, list[dict[str, Any]]] = {}
    for s in run.samples:
        o = s.get("output")
        if isinstance(o, str) and o.lower().endswith((".png", ".gif")) and (run.path / o).is_file():
            out.setdefault(int(s["step"]), []).append(s)
    return out


def pick_steps(steps: Sequence[int], k: int) -> list[int]:
    """Up to `k` steps spread evenly, first and last included."""
    if len(steps) <= k:
        return list(steps)
    return sorted({steps[round(i * (len(steps) - 1) / (k - 1))] for i in range(k)})


def frames_of(path: Path, max_frames: int = 8) -> Any:
    """An image's pixels, or a clip's first frames side by side (an (H, W, 3) uint8 array)."""
    import numpy as np
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)][:max_frames]
    return np.concatenate(frames, axis=1)


def sample_grid(run: Run, out_dir: Path, steps: int = 6, per_step: int = 4) -> Path | None:
    """Rows: steps over training; columns: samples (a clip as its frame strip); reward on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = media_rows(run)
    if not rows:
        return None
    chosen = pick_steps(sorted(rows), steps)
    cols = min(per_step, max(len(rows[s]) for s in chosen))
    clip = any(s["output"].lower().endswith(".gif") for s in rows[chosen[0]])
    width = (3.2 if clip else 1.8) * cols
    fig, axes = plt.subplots(
        len(chosen), cols, figsize=(width, 1.9 * len(chosen)), dpi=100, squeeze=False
    )
    for i, step in enumerate(chosen):
        for j in range(cols):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(rows[step]):
                s = rows[step][j]
                ax.imshow(frames_of(run.path / s["output"]))
                reward = s.get("reward")
                shown = f"{reward:.3f}" if isinstance(reward, (int, float)) else "failed"
                ax.set_title(f"step {step}  r={shown}", fontsize=7)
    fig.suptitle(f"{run.name}: samples over training", fontsize=9)
    fig.tight_layout()
    path = out_dir / f"samples_{_slug(run.name)}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
