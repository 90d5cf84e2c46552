"""log.report_to: a 3-step run fed to the real TensorBoard, wandb (offline), trackio and MLflow
libraries, each read back with its own reader and compared with metrics.jsonl/samples.jsonl;
start and mid-run failures; rank 0 only."""

from __future__ import annotations

import json
import logging
import math
import uuid
from pathlib import Path

import pytest
from tiny_runs import make, write_media_run

from grpo_ar.errors import ConfigError
from grpo_ar.io.metric_names import rename_metrics
from grpo_ar.io.trackers import TRACKERS, RunInfo, Tracker, Trackers, register_tracker
from grpo_ar.parallel.ddp import Parallel


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """3 steps reported to all four trackers under TRL's metric names."""
    root = tmp_path_factory.mktemp("trackers")
    with pytest.MonkeyPatch.context() as mp:
        offline_stores(mp, root)
        trainer = make(
            root / "run",
            [
                "log.report_to=[tensorboard, wandb, trackio, mlflow]",
                "log.metric_names=trl",
                "log.project=trk_test",
                "log.tracker_args.wandb.mode=offline",
            ],
        )
        errors = Errors()
        logging.getLogger("grpo_ar").addHandler(errors)
        try:
            trainer.train()
        finally:
            logging.getLogger("grpo_ar").removeHandler(errors)
    assert errors.seen == []  # no tracker dropped out
    return root / "run"


def offline_stores(mp: pytest.MonkeyPatch, root: Path) -> None:
    """Every library's local store and cache inside the test's folder; no network."""
    mp.setenv("TRACKIO_DIR", str(root / "trackio"))  # read when trackio is first imported
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        mp.setenv(var, str(root / "wandb_home"))
    mp.setenv("WANDB_SILENT", "true")
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)


class Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.seen = []

    def emit(self, record):
        self.seen.append(record.getMessage())


def test_metrics_jsonl_has_kl_and_per_reward_columns(run):
    rows = jsonl(run / "metrics.jsonl")
    train = [r for r in rows if "reward/mean" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["kl"] >= 0 and "reward/trk_sevens/mean" in r for r in train)
    samples = jsonl(run / "samples.jsonl")
    assert [s["step"] for s in samples] == [1, 1, 2, 2, 3, 3]
    for s in samples:  # each reward's own column, and their (weight 1) sum
        assert set(s["rewards"]) == {"trk_sevens", "trk_short"}
        assert s["reward"] == pytest.approx(sum(s["rewards"].values()), abs=1e-6)


def expected_scalars(run: Path) -> dict[tuple[str, int], float]:
    """(TRL name, step) -> value, from metrics.jsonl (later rows of a step win, as logged)."""
    out = {}
    for r in jsonl(run / "metrics.jsonl"):
        finite = {k: v for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
        finite = {k: float(v) for k, v in finite.items() if math.isfinite(v)}
        for k, v in rename_metrics(finite, "trl").items():
            out[(k, r["step"])] = v
    return out


def test_tensorboard_event_files_equal_metrics_jsonl(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    got = {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    want = expected_scalars(run)
    assert {"reward", "rewards/trk_sevens/mean", "kl", "completions/mean_length"} <= {
        k for k, _ in got
    }
    assert got.keys() == want.keys()
    for key, v in want.items():  # event files hold float32
        assert got[key] == pytest.approx(v, rel=1e-6, abs=1e-7), key
    # the completion table as text, one row per sample
    texts = acc.Tags()["tensors"]
    assert any(t.startswith("completions") for t in texts)


def test_wandb_offline_writes_run_files_and_the_table(run):
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))  # the run's history stream
    tables = sorted((runs[0] / "files" / "media" / "table").glob("completions_*.table.json"))
    assert len(tables) == 3  # one per step
    samples = jsonl(run / "samples.jsonl")
    for path in tables:
        table = json.loads(path.read_text())
        assert table["columns"] == [
            "step", "prompt", "completion", "trk_sevens", "trk_short", "reward", "advantage"
        ]  # fmt: skip
        step = table["data"][0][0]
        want = [s for s in samples if s["step"] == step]
        got = [dict(zip(table["columns"], row)) for row in table["data"]]
        assert [g["completion"] for g in got] == [s["output"] for s in want]
        assert [g["advantage"] for g in got] == pytest.approx([s["advantage"] for s in want])
        assert [g["trk_sevens"] for g in got] == [s["rewards"]["trk_sevens"] for s in want]


def test_trackio_local_store_reads_back(run):
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("trk_test", "run")
    want = expected_scalars(run)
    got = {}
    for entry in logs:
        for k, v in entry.items():
            if isinstance(v, (int, float)) and (k, entry["step"]) in want:
                got[(k, entry["step"])] = v
    assert got.keys() == want.keys()
    for key, v in want.items():
        assert got[key] == pytest.approx(v, rel=1e-9), key
    tables = [e["completions"] for e in logs if "completions" in e]
    assert len(tables) == 3


def test_mlflow_local_store_reads_back(run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient((run / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("trk_test")
    (r,) = client.search_runs([exp.experiment_id])
    assert r.info.run_name == "run" and r.info.status == "FINISHED"
    want = expected_scalars(run)
    for name in {k for k, _ in want}:
        hist = client.get_metric_history(r.info.run_id, name)
        got = {(name, m.step): m.value for m in hist}
        assert got == pytest.approx({k: v for k, v in want.items() if k[0] == name})
    arts = [a.path for a in client.list_artifacts(r.info.run_id, "completions")]
    assert arts == [f"completions/step_{s:06d}.json" for s in (1, 2, 3)]
    local = client.download_artifacts(r.info.run_id, "completions/step_000002.json")
    table = json.loads(Path(local).read_text())
    steps = [row[table["columns"].index("step")] for row in table["data"]]
    assert steps == [2, 2]


def test_a_run_that_raises_marks_its_mlflow_run_failed(tmp_path, monkeypatch):
    """A crash mid-run closes the trackers with a failed status (not left RUNNING)."""
    from mlflow.tracking import MlflowClient

    offline_stores(monkeypatch, tmp_path)
    trainer = make(tmp_path / "run", ["log.report_to=[mlflow]", "log.project=trk_crash"])
    real = trainer.train_step

    def step_then_crash():
        if trainer.step == 1:
            raise RuntimeError("boom at step 2")
        return real()

    monkeypatch.setattr(trainer, "train_step", step_then_crash)
    with pytest.raises(RuntimeError, match="boom at step 2"):
        trainer.train()
    client = MlflowClient((tmp_path / "run" / "mlruns").resolve().as_uri())
    (r,) = client.search_runs([client.get_experiment_by_name("trk_crash").experiment_id])
    assert r.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(r.info.run_id, "loss")] == [1]


@register_tracker("trk_broken_start")
class BrokenStart(Tracker):
    def __init__(self, run, **kwargs):
        raise RuntimeError("no route to the tracking server")


@register_tracker("trk_not_installed")
class NotInstalled(Tracker):
    extra = "trk"

    def __init__(self, run, **kwargs):
        import grpo_ar_no_such_tracker_library  # noqa: F401


@register_tracker("trk_broken_later")
class BrokenLater(Tracker):
    seen: list[int] = []

    def log(self, metrics, step):
        if step == 2:
            raise OSError("disk full")
        BrokenLater.seen.append(step)


def test_a_tracker_that_cannot_start_fails_before_the_first_step(tmp_path):
    trainer = make(tmp_path, ["log.report_to=[tensorboard, trk_broken_start]"])
    with pytest.raises(ConfigError, match="tracker 'trk_broken_start' could not start: no route"):
        trainer.train()
    assert trainer.step == 0 and not (tmp_path / "metrics.jsonl").exists()
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbaord'; known: .*tensorboard"):
        make(tmp_path, ["log.report_to=[tensorbaord]"]).train()
    # the real MLflow refusing a store URI it has no backend for
    bad = ["log.report_to=[mlflow]", "log.tracker_args.mlflow.tracking_uri=nosuchstore://x"]
    with pytest.raises(ConfigError, match="tracker 'mlflow' could not start: .*nosuchstore"):
        make(tmp_path, bad).train()
    with pytest.raises(ConfigError, match=r"lacks it"):
        make(tmp_path, ["log.tracker_args.wandb.mode=offline"]).train()
    with pytest.raises(
        ConfigError, match=r"'trk_not_installed' but No module named .*grpo-ar\[trk\]"
    ):
        make(tmp_path, ["log.report_to=[trk_not_installed]"]).train()
    assert {"tensorboard", "wandb", "trackio", "mlflow"} <= set(TRACKERS)


def test_a_tracker_failing_mid_run_is_logged_and_the_run_goes_on(tmp_path, caplog):
    BrokenLater.seen.clear()
    trainer = make(tmp_path, ["log.report_to=[trk_broken_later, tensorboard]"])
    with caplog.at_level(logging.ERROR, logger="grpo_ar"):
        trainer.train()
    assert trainer.step == 3
    assert BrokenLater.seen == [0, 1]  # eval at 0, step 1, then dropped at step 2
    errors = [r.getMessage() for r in caplog.records if "trk_broken_later" in r.getMessage()]
    assert len(errors) == 1 and "failed at step 2 (OSError: disk full)" in errors[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted({e.step for e in acc.Scalars("reward/mean")}) == [1, 2, 3]  # others go on


class OtherRank(Parallel):
    """The real one-process Parallel, seen from rank 1 (not the main rank)."""

    rank = 1


def test_only_rank_0_starts_trackers(tmp_path):
    trainer = make(tmp_path, ["log.report_to=[tensorboard]"], parallel=OtherRank())
    trainer.train()
    assert trainer.step == 3
    assert not (tmp_path / "tensorboard").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_images_and_clips_become_each_trackers_media(tmp_path):
    """samples.jsonl rows of a video run (GIFs) and an image run (PNGs), logged as a table."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    gif, png = write_media_run(tmp_path, "gif", steps=1), write_media_run(tmp_path, "png", steps=1)
    rows = jsonl(gif / "samples.jsonl") + [
        {**r, "output": f"../png/{r['output']}"} for r in jsonl(png / "samples.jsonl")
    ]
    with pytest.MonkeyPatch.context() as mp:
        offline_stores(mp, tmp_path)
        from trackio.utils import MEDIA_DIR  # after TRACKIO_DIR is set, if first imported here

        project = f"trk_media_{uuid.uuid4().hex[:8]}"  # a store read earlier may hold other runs
        info = RunInfo(gif, project, "media")
        trackers = Trackers.start(
            ["tensorboard", "wandb", "trackio", "mlflow"], info, args={"wandb": {"mode": "offline"}}
        )
        trackers.log_samples(rows, step=1)
        assert set(trackers.trackers) == {"tensorboard", "wandb", "trackio", "mlflow"}
        trackers.close()
    acc = EventAccumulator(str(gif / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert sorted(acc.Tags()["images"]) == [f"completions/{i}" for i in range(4)]
    strip = acc.Images("completions/0")[0]  # a clip as its 3 frames side by side
    assert (strip.width, strip.height) == (24, 8)
    (table,) = (gif / "wandb").glob("offline-run-*/files/media/table/*.table.json")
    cells = [row[2] for row in json.loads(table.read_text())["data"]]
    assert cells == ["Video", "Video", "Image", "Image"]  # wandb.Video / wandb.Image cells
    stored = sorted(p.suffix for p in (MEDIA_DIR / project / "media").rglob("*.*"))
    assert stored == [".gif", ".gif", ".png", ".png"]
    client = MlflowClient((gif / "mlruns").resolve().as_uri())
    (r,) = client.search_runs([client.get_experiment_by_name(project).experiment_id])
    arts = client.list_artifacts(r.info.run_id, "completions/step_000001")
    assert sorted(Path(a.path).suffix for a in arts) == [".gif", ".gif", ".png", ".png"]
