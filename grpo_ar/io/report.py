"""`grpo-ar report RUN [RUN2 ...]`: a self-contained report.html (PNG curves embedded as data
URIs, also written beside it), sample grids of image/video runs, completion tables of text runs,
each run's resolved config; several runs overlaid on the same curves. Needs matplotlib
(`pip install 'grpo-ar[report]'`)."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .report_plots import PANELS, Run, media_rows, pick_steps, plot_panel, sample_grid, series
from .run_files import read_jsonl


def read_rows(path: Path) -> list[dict[str, Any]]:
    """JSONL rows (none when the file is missing); a cut last line is skipped with a warning."""
    return read_jsonl(path) if path.exists() else []


def load_run(path: str | Path, name: str | None = None) -> Run:
    path = Path(path)
    if not (path / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{path / 'metrics.jsonl'} does not exist")
    config = path / "config.yaml"
    return Run(
        name or path.resolve().name,
        path,
        read_rows(path / "metrics.jsonl"),
        read_rows(path / "samples.jsonl"),
        config.read_text(encoding="utf-8") if config.exists() else "",
    )


def unique_names(paths: Sequence[Path]) -> list[str]:
    """Run labels: the folder names, with the parent's name added where two collide."""
    names = [p.resolve().name for p in paths]
    return [
        f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)
    ]


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None) -> Path:
    """Write out_dir/report.html and its PNGs (default out_dir: the first run's report/)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(
            "the HTML report needs matplotlib: pip install 'grpo-ar[report]'"
        ) from None
    paths = [Path(p) for p in run_dirs]
    runs = [load_run(p, n) for p, n in zip(paths, unique_names(paths))]
    out = Path(out_dir) if out_dir is not None else paths[0] / "report"
    out.mkdir(parents=True, exist_ok=True)
    curves = [p for panel in PANELS if (p := plot_panel(runs, panel, out)) is not None]
    grids = [(r, p) for r in runs if (p := sample_grid(r, out)) is not None]
    parts = [_summary(runs), "<h2>Curves</h2>"]
    parts += [_figure(p, p.stem, "curve") for p in curves]
    for run, grid in grids:
        parts.append(f"<h2>Samples over training: {_e(run.name)}</h2>")
        parts.append(_figure(grid, f"samples of {run.name}", "grid"))
        parts.append(_clips(run))
    for run in runs:
        if not media_rows(run) and run.samples:
            parts.append(f"<h2>Completions: {_e(run.name)}</h2>{_completions(run)}")
    for run in runs:
        parts.append(
            f"<details><summary>Resolved config: {_e(run.name)}</summary>"
            f"<pre>{_e(run.config or '(no config.yaml)')}</pre></details>"
        )
    title = "grpo_ar report: " + ", ".join(r.name for r in runs)
    page = TEMPLATE.format(title=_e(title), body="\n".join(parts))
    (out / "report.html").write_text(page, encoding="utf-8")
    return out / "report.html"


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: .5em 0; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; vertical-align: top; }}
td.text {{ text-align: left; font-family: monospace; white-space: pre-wrap; max-width: 420px; }}
figure {{ display: inline-block; margin: .3em; }} pre {{ background: #f6f6f6; padding: .5em; }}
</style></head><body><h1>{title}</h1>
{body}
</body></html>
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _data_uri(path: Path) -> str:
    kind = "image/gif" if path.suffix.lower() == ".gif" else "image/png"
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _figure(path: Path, alt: str, cls: str) -> str:
    return f'<figure><img class="{cls}" alt="{_e(alt)}" src="{_data_uri(path)}"></figure>'


def _num(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) and math.isfinite(x) else "–"


def _summary(runs: Sequence[Run]) -> str:
    """One row per run: steps, last reward, best held-out reward, time, tokens/s."""
    head = ["run", "steps", "reward (first)", "reward (last)", "best eval", "time (s)", "tokens/s"]
    rows = []
    for r in runs:
        steps, reward = series(r, "reward/mean")
        evals = [v for k in {k for m in r.metrics for k in m if k.startswith("eval/")}
                 if k.endswith("/reward") for v in series(r, k)[1]]  # fmt: skip
        _, t = series(r, "time/step")
        _, tps = series(r, "tokens_per_s")
        cells = [
            r.name,
            str(steps[-1] if steps else 0),
            _num(reward[0] if reward else None),
            _num(reward[-1] if reward else None),
            _num(max(evals) if evals else None),
            _num(sum(t)),
            _num(sum(tps) / len(tps) if tps else None),
        ]
        rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
    return f"<h2>Runs</h2><table>{header}{''.join(rows)}</table>"


def _completions(run: Run, steps: int = 3, per_step: int = 4) -> str:
    """Text completions at the first, middle and last logged steps, one column per reward."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for s in run.samples:
        by_step.setdefault(int(s["step"]), []).append(s)
    names = sorted({k for s in run.samples for k in s.get("rewards", {})})
    head = ["step", "prompt", "completion", *names, "reward", "advantage"]
    rows = []
    for step in pick_steps(sorted(by_step), steps):
        for s in by_step[step][:per_step]:
            per = [_num(s.get("rewards", {}).get(n)) for n in names]
            cells = [str(step), s.get("prompt"), s.get("output"), *per]
            cells += [_num(s.get("reward")), _num(s.get("advantage"))]
            rows.append(
                "<tr>"
                + "".join(
                    f'<td class="text">{_e(c)}</td>' if i in (1, 2) else f"<td>{_e(c)}</td>"
                    for i, c in enumerate(cells)
                )
                + "</tr>"
            )
    header = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"
    return f"<table>{header}{''.join(rows)}</table>"


def _clips(run: Run) -> str:
    """The first and last step's clips, playing (animated GIFs); nothing for image runs."""
    rows = media_rows(run)
    steps = sorted(rows)
    shown = [steps[0], steps[-1]] if steps else []
    gifs = [
        (step, s)
        for step in dict.fromkeys(shown)
        for s in rows[step][:4]
        if s["output"].lower().endswith(".gif")
    ]
    if not gifs:
        return ""
    figs = [
        f'<figure><img class="clip" alt="step {step}" src="{_data_uri(run.path / s["output"])}">'
        f"<figcaption>step {step}, r={_num(s.get('reward'))}</figcaption></figure>"
        for step, s in gifs
    ]
    return "<div>" + "".join(figs) + "</div>"
