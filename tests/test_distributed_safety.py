"""`grpo-ar train` under torchrun (2 CPU ranks, gloo) when one rank misbehaves: a reward that
hangs on rank 1 ends the job after trainer.dist_timeout_s with a message naming the rank that
waited; a reward that fails on every sample of rank 1 stops the job with its error instead of
training on advantages of 0."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny import save_char_llama

# Registers the misbehaving rewards in every rank, then runs the CLI as torchrun would.
SCRIPT = """
import os, sys, time
from grpo_ar.rewards import per_sample, register_reward

@register_reward("hangs_on_rank1")
@per_sample
def hangs_on_rank1(output: str) -> float:
    if os.environ["RANK"] == "1":
        time.sleep(120)
    return 1.0

@register_reward("fails_on_rank1")
@per_sample
def fails_on_rank1(output: str) -> float:
    if os.environ["RANK"] == "1":
        raise ConnectionError("judge endpoint refused")
    return float(len(output))

from grpo_ar.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_safety")
    save_char_llama(root / "model")
    (root / "launch.py").write_text(SCRIPT)
    return root


def launch(
    root: Path, reward: str, run: Path, timeout_s: int = 4
) -> tuple[subprocess.CompletedProcess, float]:
    rows = [{"prompt": f"{a}+1=", "rewards": reward} for a in range(4)]
    (root / f"{reward}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = root / f"{reward}.toml"
    cfg.write_text(f"""
[model]
path = "{root / "model"}"
device = "cpu"
[sampling]
max_new_tokens = 2
[algorithm]
group_size = 2
beta = 0.0
[trainer]
steps = 1
batch_size = 4
threads = 1
dist_timeout_s = {timeout_s}
[data]
train = "{root / f"{reward}.jsonl"}"
[log]
run_dir = "{run}"
progress = false
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    start = time.perf_counter()
    p = subprocess.run(
        [*cmd, str(root / "launch.py"), "train", str(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    return p, time.perf_counter() - start


@pytest.mark.slow
def test_a_hanging_rank_ends_the_job_after_the_timeout(ws, tmp_path):
    p, took = launch(ws, "hangs_on_rank1", tmp_path / "run")
    assert p.returncode != 0
    line = "grpo-ar: error: rank 0: waited trainer.dist_timeout_s=4 s for the other ranks"
    assert line in p.stderr, p.stderr[-3000:]
    assert took < 100  # not gloo's 30 minutes, nor the reward's 120 s
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_reward_failing_on_one_rank_stops_the_job_with_its_error(ws, tmp_path):
    # a timeout long enough for rank 1 to report its reward's failure on a loaded machine (with
    # 4 s, rank 0 could give up waiting first and end the job with the timeout's message)
    p, _ = launch(ws, "fails_on_rank1", tmp_path / "run", timeout_s=60)
    assert p.returncode != 0
    err = p.stderr
    assert "grpo-ar: error: rank 1 failed while sampling or scoring: step 1: 4 of 4" in err, err
    assert "ConnectionError: judge endpoint refused" in err
    # tracebacks there are the reward's failure (logged once) and torchrun's own; none of ours
    assert "grpo_ar/cli.py" not in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
