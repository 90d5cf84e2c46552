"""Smoke test of the main demo (examples/text_arithmetic/run.py): 2 GRPO steps end to end."""

from __future__ import annotations

import json

from example_modules import example_module


def test_demo_runs_two_steps(tmp_path, capsys):
    with example_module("text_arithmetic", "run") as run:
        out = run.main(
            [
                "--base",
                str(tmp_path / "base"),
                "--pretrain-steps",
                "3",
                "--eval-n",
                "8",
                "--set",
                "trainer.steps=2",
                "--set",
                "trainer.iterations=1",
                "--set",
                "trainer.batch_size=2",
                "--set",
                f"log.run_dir={tmp_path / 'run'}",
                "--set",
                "log.progress=false",
                "--seeds",
                "0",
                "--eval-seeds",
                "5",
            ]
        )
    text = capsys.readouterr().out
    assert "held-out accuracy before GRPO" in text and "held-out accuracy after  GRPO" in text
    (cell,) = out["cells"]
    assert (cell["train_seed"], cell["eval_seed"]) == (0, 5)
    assert all(0.0 <= v <= 1.0 for m in (cell["before"], cell["after"]) for v in m.values())
    assert json.loads((tmp_path / "run" / "results.json").read_text())["cells"] == [cell]
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "run" / "seed0" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2]
    assert (tmp_path / "run" / "seed0" / "checkpoints" / "latest").exists()
    # the pre-trained start is cached: a second call reuses it instead of training again
    assert (tmp_path / "base" / "meta.json").exists()
