"""Experiment trackers (`log.report_to`): TensorBoard, Weights & Biases, trackio, MLflow.

Each backend is one small class using its own library's API, registered in `TRACKERS`, so a
user adds one with `@register_tracker("name")`. The trainer holds a `Trackers` fan-out on rank 0
only: a tracker that cannot start is a ConfigError before the first step; one that fails
mid-run is logged once and dropped while the run (and the other trackers) go on.

Completion tables: rows as `append_samples` returns them (step, prompt, output, reward,
per-reward `rewards`, advantage); an `output` that is a path under the run directory (.png
image, .gif clip) is logged as the tracker's image/video type."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .metric_names import rename_metrics

log = logging.getLogger("grpo_ar")

TRACKERS: dict[str, type[Tracker]] = {}


def register_tracker(name: str) -> Callable[[type[Tracker]], type[Tracker]]:
    def add(cls: type[Tracker]) -> type[Tracker]:
        TRACKERS[name] = cls
        return cls

    return add


@dataclass
class RunInfo:
    """What every tracker gets at start."""

    run_dir: Path
    project: str
    name: str
    config: dict[str, Any] = field(default_factory=dict)


class Tracker:
    """One backend: starts in `__init__` (raising if it cannot), then log / log_samples / close."""

    extra = ""  # the pip extra that installs its library

    def __init__(self, run: RunInfo, **kwargs: Any) -> None:
        self.run = run

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_samples(self, rows: Sequence[dict[str, Any]], step: int) -> None:
        """One completion table per call; default: none."""

    def close(self, failed: bool = False) -> None:
        """End the tracker's run; `failed`: the training run stopped with an error."""

    # helpers for subclasses
    def media(self, row: dict[str, Any]) -> Path | None:
        """The image/clip file a row's output names, or None for text."""
        out = row.get("output")
        if not isinstance(out, str) or Path(out).suffix.lower() not in (".png", ".gif"):
            return None
        path = self.run.run_dir / out
        return path if path.is_file() else None


def table_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """step, prompt, completion, one column per reward, reward, advantage."""
    names = sorted({k for r in rows for k in r.get("rewards", {})})
    return ["step", "prompt", "completion", *names, "reward", "advantage"]


def table_values(row: dict[str, Any], completion: Any, columns: list[str]) -> list[Any]:
    rewards = row.get("rewards", {})
    per = [rewards.get(c) for c in columns[3:-2]]
    return [row["step"], str(row["prompt"]), completion, *per, row["reward"], row["advantage"]]


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    """Numbers only, non-finite dropped (metrics.jsonl writes those as null)."""
    out = {}
    for k, v in metrics.items():
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


class Trackers:
    """The run's trackers: every call goes to each; a failure drops that tracker, not the run."""

    def __init__(self, trackers: dict[str, Tracker] | None = None, names: str = "grpo_ar"):
        self.trackers = dict(trackers or {})
        self.names = names

    @classmethod
    def start(
        cls,
        report_to: Sequence[str],
        run: RunInfo,
        names: str = "grpo_ar",
        args: dict[str, dict[str, Any]] | None = None,
    ) -> Trackers:
        """Start every tracker of `report_to`; any that cannot start -> one ConfigError."""
        args = args or {}
        unknown = [n for n in report_to if n not in TRACKERS]
        if unknown:
            raise ConfigError(
                f"log.report_to: unknown tracker {unknown[0]!r}; known: {', '.join(sorted(TRACKERS))}"
                " (add one with grpo_ar.io.trackers.register_tracker)"
            )
        extra = sorted(set(args) - set(report_to))
        if extra:
            raise ConfigError(f"log.tracker_args.{extra[0]} is set but log.report_to lacks it")
        started: dict[str, Tracker] = {}
        for name in report_to:
            kind = TRACKERS[name]
            try:
                started[name] = kind(run, **args.get(name, {}))
            except ImportError as e:
                cls(started).close()
                hint = f"pip install 'grpo-ar[{kind.extra}]'" if kind.extra else "install it"
                raise ConfigError(f"log.report_to has {name!r} but {e}; {hint}") from None
            except Exception as e:
                cls(started).close()
                raise ConfigError(f"tracker {name!r} could not start: {e}") from e
        return cls(started, names)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.trackers:
            values = _finite(metrics)
            try:
                values = rename_metrics(values, self.names)
            except ValueError as e:  # two names colliding must not stop the run
                log.error("step %d: %s; logging grpo_ar's names instead", step, e)
            self._each("log", step, values, step)

    def log_samples(self, rows: Sequence[dict[str, Any]], step: int) -> None:
        if self.trackers and rows:
            self._each("log_samples", step, rows, step)

    def close(self, failed: bool = False) -> None:
        """Close every tracker (a run that raised is marked failed where the backend can)."""
        for name, t in list(self.trackers.items()):
            try:
                t.close(failed)
            except Exception as e:  # closing must not hide the run's own outcome
                log.warning("tracker %s failed to close: %s", name, e)
        self.trackers.clear()

    def _each(self, method: str, step: int, *a: Any) -> None:
        for name, t in list(self.trackers.items()):
            try:
                getattr(t, method)(*a)
            except Exception as e:
                log.error(
                    "tracker %s failed at step %d (%s: %s); the run continues without it",
                    name,
                    step,
                    type(e).__name__,
                    e,
                )
                del self.trackers[name]
                with contextlib.suppress(Exception):  # already failed; the error above says so
                    t.close()


@register_tracker("tensorboard")
class TensorBoard(Tracker):
    """torch.utils.tensorboard event files under run_dir/tensorboard (or `log_dir`)."""

    extra = "tensorboard"

    def __init__(self, run: RunInfo, log_dir: str | None = None, **kwargs: Any) -> None:
        super().__init__(run)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir or str(run.run_dir / "tensorboard"), **kwargs)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_samples(self, rows: Sequence[dict[str, Any]], step: int) -> None:
        import numpy as np

        columns = table_columns(rows)
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for i, row in enumerate(rows):
            path = self.media(row)
            shown = f"image {i}" if path else str(row["output"])
            cells = table_values(row, shown, columns)
            lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
            if path is not None:
                self.writer.add_image(
                    f"completions/{i}", np.asarray(_strip(path)), step, dataformats="HWC"
                )
        self.writer.add_text("completions", "\n".join(lines), step)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


def _md(x: Any) -> str:
    text = f"{x:.4g}" if isinstance(x, float) else str(x)
    return text.replace("|", "\\|").replace("\n", " ")


def _strip(path: Path) -> Any:
    """An RGB PIL image: the file itself, or a clip's frames side by side."""
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        frames = [f.convert("RGB") for f in ImageSequence.Iterator(im)]
    w, h = frames[0].size
    strip = Image.new("RGB", (w * len(frames), h))
    for i, f in enumerate(frames):
        strip.paste(f, (i * w, 0))
    return strip


@register_tracker("wandb")
class WandB(Tracker):
    """wandb.init under run_dir/wandb; completions as a wandb.Table with wandb.Image/Video.
    Offline: `log.tracker_args = {wandb = {mode = "offline"}}` or WANDB_MODE=offline."""

    extra = "wandb"

    def __init__(self, run: RunInfo, **kwargs: Any) -> None:
        super().__init__(run)
        import wandb

        self.wandb = wandb
        kw = {"project": run.project, "name": run.name, "dir": str(run.run_dir)}
        self.run_ = wandb.init(**{**kw, "config": run.config, **kwargs})

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run_.log(metrics, step=step)

    def log_samples(self, rows: Sequence[dict[str, Any]], step: int) -> None:
        columns: list[Any] = table_columns(rows)
        table = self.wandb.Table(columns=columns, allow_mixed_types=True)
        for row in rows:
            path = self.media(row)
            if path is None:
                shown: Any = str(row["output"])
            elif path.suffix.lower() == ".gif":
                shown = self.wandb.Video(str(path), format="gif")
            else:
                shown = self.wandb.Image(str(path))
            table.add_data(*table_values(row, shown, columns))
        self.run_.log({"completions": table}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run_.finish(exit_code=1 if failed else 0)


@register_tracker("trackio")
class Trackio(Tracker):
    """trackio.init (local store: $TRACKIO_DIR when set, else RUN/trackio, so a run writes
    nothing outside its directory); completions as a trackio.Table with trackio.Image/Video."""

    extra = "trackio"

    def __init__(self, run: RunInfo, **kwargs: Any) -> None:
        super().__init__(run)
        if "trackio" not in sys.modules:  # trackio reads TRACKIO_DIR once, when imported
            os.environ.setdefault("TRACKIO_DIR", str(run.run_dir / "trackio"))
        import trackio

        self.trackio = trackio
        kw = {"auto_log_cpu": False, "auto_log_gpu": False, **kwargs}
        self.run_ = trackio.init(project=run.project, name=run.name, config=run.config, **kw)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run_.log(metrics, step=step)

    def log_samples(self, rows: Sequence[dict[str, Any]], step: int) -> None:
        columns = table_columns(rows)
        data = []
        for row in rows:
            path = self.media(row)
            if path is None:
                shown: Any = str(row["output"])
            elif path.suffix.lower() == ".gif":
                shown = self.trackio.Video(str(path))
            else:
                shown = self.trackio.Image(str(path))
            data.append(table_values(row, shown, columns))
        self.run_.log({"completions": self.trackio.Table(columns=columns, data=data)}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run_.finish()


@register_tracker("mlflow")
class MLflow(Tracker):
    """MlflowClient: metrics, config.json, completions/step_N.json tables and their media as
    artifacts. Store: `tracking_uri`, else MLFLOW_TRACKING_URI, else run_dir/mlruns."""

    extra = "mlflow"

    def __init__(self, run: RunInfo, tracking_uri: str | None = None) -> None:
        super().__init__(run)
        import mlflow

        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # mlflow 3 keeps the plain-file store only behind this opt-in; a local run needs
            # no database or server
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run.run_dir / "mlruns").resolve().as_uri()
        self.mlflow, self.client = mlflow, mlflow.tracking.MlflowClient(uri)
        exp = self.client.get_experiment_by_name(run.project)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(run.project)
        self.run_id = self.client.create_run(exp_id, run_name=run.name).info.run_id
        self.client.log_dict(self.run_id, run.config, "config.json")

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        now = int(time.time() * 1000)
        batch = [self.mlflow.entities.Metric(k, v, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_samples(self, rows: Sequence[dict[str, Any]], step: int) -> None:
        columns = table_columns(rows)
        data: dict[str, list[Any]] = {c: [] for c in columns}
        folder = f"completions/step_{step:06d}"
        for row in rows:
            path = self.media(row)
            if path is not None:
                self.client.log_artifact(self.run_id, str(path), folder)
            shown = f"{folder}/{path.name}" if path else str(row["output"])
            for c, v in zip(columns, table_values(row, shown, columns)):
                data[c].append(v)
        self.client.log_table(self.run_id, data, f"{folder}.json")

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def start_trackers(log_cfg: Any, run_dir: Path, config: dict[str, Any]) -> Trackers:
    """The trackers `log_cfg.report_to` names (a LogConfig), started for the run in run_dir."""
    name = log_cfg.run_name or Path(run_dir).resolve().name
    run = RunInfo(Path(run_dir), log_cfg.project, name, config)
    return Trackers.start(log_cfg.report_to, run, log_cfg.metric_names, log_cfg.tracker_args)
