"""Multi-turn GRPO under data parallelism: `grpo-ar train` with an `[environment]` (a custom
Environment named "module:attr") on 2 torchrun ranks (DDP, CPU, gloo) gives the one-process
run's losses, rewards, turn metrics and final weights for the same global batch. Trajectories
shard by prompt like single-turn completions: each rank runs the episodes of its prompts, with
the draws the one-process run gives those rows.

One torchrun launch (this file is also the worker: `python -m torch.distributed.run
--nproc_per_node=2 tests/test_multiturn_distributed.py OUT`); the one-process run is in the
pytest process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_distributed import launch_two_ranks  # noqa: E402

from grpo_ar.cli import main  # noqa: E402
from grpo_ar.io.checkpoint import latest_checkpoint, load_tensors  # noqa: E402
from tiny import save_char_llama  # noqa: E402

ENV_PY = '''
from grpo_ar.train.environments import Environment, Observation


class Counter(Environment):
    """Answers turn k with "=k" and k x's, reward k + (the turn ends in a digit); done after
    `length` turns."""

    def __init__(self, length: int = 3, **kw):
        super().__init__(**kw)
        self.length = length

    def reset(self, entry):
        return {"turn": 0}

    def step(self, state, text, tokens):
        state["turn"] += 1
        k = state["turn"]
        reward = k + float(text[-1:].isdigit())
        return Observation(text=f"={k}" + "x" * k, reward=reward, done=k >= self.length)

    def stats(self, state):
        return {"turns_seen": float(state["turn"])}
'''
EOS = "[" + ",".join(str(i) for i in [2, *range(3, 30)]) + "]"


def write_inputs(out: Path) -> None:
    """A tiny Llama, an environment module, a JSONL dataset and the run's TOML config."""
    save_char_llama(out / "model")
    (out / "mt_dist_env.py").write_text(ENV_PY)
    rows = [{"prompt": f"{i}+{i}="} for i in range(8)]
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "run.toml").write_text(
        f"""
[model]
path = "{out / "model"}"
device = "cpu"
[sampling]
max_new_tokens = 5
eos_token_ids = {EOS}
[algorithm]
group_size = 4
grpo_iters = 2
beta = 0.04
[trainer]
steps = 2
batch_size = 4
grad_accum = 2
lr = 3e-3
optimizer_args = {{eps = 1e-4}}
[data]
train = "{out / "train.jsonl"}"
rewards = [{{name = "environment"}}]
[log]
progress = false
[environment]
name = "mt_dist_env:Counter"
path = "{out}"
max_turns = 3
max_tokens = 40
credit = "per_turn"
kwargs = {{length = 3}}
"""
    )


def worker(out: Path) -> None:
    import torch

    torch.set_num_threads(1)
    # strategy auto = ddp under torchrun; rank 0 writes the run directory
    assert (
        main(["train", "--debug", str(out / "run.toml"), "--set", f"log.run_dir={out / 'two'}"])
        == 0
    )


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    out = tmp_path_factory.mktemp("mt_dist")
    write_inputs(out)
    return launch_two_ranks(__file__, out, timeout=420)


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_trajectories(launch, tmp_path):
    assert main(["train", str(launch / "run.toml"), "--set", f"log.run_dir={tmp_path}"]) == 0
    one, two = metrics(tmp_path), metrics(launch / "two")
    assert len(one) == len(two) == 2
    for a, b in zip(two, one):
        assert a["turns/mean"] > 1.5 and 0 < a["turns/env_token_frac"] < 1  # multi-turn
        # the same trajectories: rewards and turn metrics of the whole batch, not rank 0's half
        for k in ("reward/mean", "turns/mean", "turns/env_token_frac", "env/turns_seen"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7), k
        for k in ("loss", "kl", "entropy", "grad_norm"):
            assert abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(b[k])), (k, a[k], b[k])
    w2 = load_tensors(latest_checkpoint(launch / "two") / "model.safetensors")
    w1 = load_tensors(latest_checkpoint(tmp_path) / "model.safetensors")
    assert set(w1) == set(w2)
    assert max(float((w2[k] - w1[k]).abs().max()) for k in w1) <= 1e-6


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
