"""Smoke test of examples/rng/run.py: a group-level reward in a real GRPO run, 3 steps."""

from __future__ import annotations

import json
import math

from example_modules import example_module, load_example


def test_rng_example_runs_three_steps(tmp_path, capsys):
    with example_module("rng", "run") as run:
        out = run.main(
            ["--base", str(tmp_path / "base"), "--pretrain-steps", "5", "--eval-n", "10",
             "--set", "trainer.steps=3", "--set", "trainer.batch_size=2",
             "--set", f"log.run_dir={tmp_path / 'run'}", "--set", "log.progress=false",
             "--seeds", "0", "--eval-seeds", "777"]
        )  # fmt: skip
    assert "held-out before GRPO" in capsys.readouterr().out
    (cell,) = out["cells"]
    for stats in (cell["before"], cell["after"]):
        assert 0.0 <= stats["entropy"] <= 1.0 + 1e-9 and 0.0 <= stats["chi2_p"] <= 1.0
        assert 1.0 <= stats["per_prompt_distinct"] <= 10.0
    lines = (tmp_path / "run" / "seed0" / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    # both rewards were computed: the group reward and the per-sample format reward
    assert all(math.isfinite(m["reward/group_entropy/mean"]) for m in metrics)
    assert all(math.isfinite(m["reward/regex_format/mean"]) for m in metrics)


def test_statistics_by_hand():
    task = load_example("rng", "task")
    s = task.statistics([list("0123456789"), ["3"] * 9 + ["x"]])
    # pooled digits: 0-9 once, 3 ten times more -> 19 digits
    p = [1 / 19] * 9 + [10 / 19]
    assert abs(s["entropy"] - (-sum(x * math.log(x) for x in p) / math.log(10))) < 1e-9
    assert s["valid"] == 19 / 20 and s["per_prompt_distinct"] == (10 + 1) / 2
    stat, pval = task.chi_square_uniform([10] * 10)
    assert stat == 0.0 and abs(pval - 1.0) < 1e-12
    stat, pval = task.chi_square_uniform([19] + [9] * 9)  # 81/10 + 9·1/10 = 9.0
    # odd df: sf = 2·Q(3) + 2·φ(3)·(3 + 27/3 + 243/15 + 2187/105) = 0.43728
    assert abs(stat - 9.0) < 1e-9 and abs(pval - 0.43728) < 1e-4
