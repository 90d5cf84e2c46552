"""The progress display: tqdm with reward, KL and tokens/s on a terminal; plain lines every N
steps into a log file (no carriage returns). Metric-name styles and their config key."""

from __future__ import annotations

import io

import pytest

from grpo_ar.config import load_config
from grpo_ar.errors import ConfigError
from grpo_ar.io.metric_names import markdown_table, rename_metrics
from grpo_ar.io.run_files import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def metrics(step: int) -> dict[str, float]:
    return {"step": step, "reward/mean": step / 100, "kl": 0.0123, "tokens_per_s": 4567.8}


def test_a_log_file_gets_one_plain_line_every_n_steps():
    out = io.StringIO()
    bar = Progress(total=80, initial=0, stream=out)  # auto: every ceil(80 / 20) = 4 steps
    for step in range(1, 81):
        bar.update(step, metrics(step))
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 20
    assert lines[0].startswith("grpo step 4/80  reward 0.040  kl 0.0123  tok/s 4568  ")
    assert lines[-1].startswith("grpo step 80/80  reward 0.800")


def test_progress_every_and_the_last_step():
    out = io.StringIO()
    bar = Progress(total=7, initial=0, every=3, stream=out)
    for step in range(1, 8):
        bar.update(step, {"step": step, "reward/mean": 1.0})
    steps = [line.split()[2] for line in out.getvalue().splitlines()]
    assert steps == ["3/7", "6/7", "7/7"]
    assert "kl" not in out.getvalue()  # beta = 0: no KL to show


def test_a_terminal_gets_the_tqdm_bar_with_reward_kl_and_tokens_per_s():
    out = Terminal()
    bar = Progress(total=3, initial=0, stream=out)
    for step in (1, 2, 3):
        bar.update(step, metrics(step))
    bar.close()
    text = out.getvalue()
    assert "\r" in text and "grpo step" not in text
    assert "reward=0.030, kl=0.0123, tok/s=4568" in text
    assert "3/3" in text


def test_metric_name_styles():
    m = {"reward/mean": 1.0, "reward/fmt/mean": 0.5, "completion/truncated": 0.25, "x": 2.0}
    assert rename_metrics(m, "trl") == {
        "reward": 1.0,
        "rewards/fmt/mean": 0.5,
        "completions/clipped_ratio": 0.25,
        "x": 2.0,
    }
    assert rename_metrics(m, "verl") == {
        "critic/score/mean": 1.0,
        "reward/fmt/mean": 0.5,
        "response_length/clip_ratio": 0.25,
        "x": 2.0,
    }
    assert rename_metrics(m, "grpo_ar") == m
    with pytest.raises(ValueError, match="both become 'reward' under trl"):
        rename_metrics({"reward/mean": 1.0, "reward": 2.0}, "trl")
    assert "| `reward/<name>/mean` | `rewards/<name>/mean` | — |" in markdown_table()


def test_log_config_keys():
    cfg = load_config(None, ["log.report_to=[tensorboard, wandb]", "log.metric_names=trl"])
    assert cfg.log.report_to == ("tensorboard", "wandb") and cfg.log.metric_names == "trl"
    with pytest.raises(ConfigError, match="log.metric_names='hf'; use grpo_ar, trl or verl"):
        load_config(None, ["log.metric_names=hf"])
    with pytest.raises(ConfigError, match="log.report_to must be a list"):
        load_config(None, ["log.report_to=wandb"])
