"""GRPO runs whose rollouts come from the real vLLM engine: weights pushed after every
optimizer step (the run learns, also one step async), and a bf16 engine (a server) under an
fp32 trainer turns the IS correction on and logs the sampler/trainer gap."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import free_port, tiny_vllm_llama

from grpo_ar.adapters.text import TextAdapter
from grpo_ar.config import load_config
from grpo_ar.generation.vllm_backend import VllmBackend
from grpo_ar.generation.vllm_server import spawn_server
from grpo_ar.io.data import load_rows
from grpo_ar.rewards import REWARDS, per_sample, register_reward
from grpo_ar.train.trainer import Trainer
from tiny import char_tokenizer

if "toy_sevens_vllm" not in REWARDS:

    @register_reward("toy_sevens_vllm")
    @per_sample
    def toy_sevens_vllm(output: str) -> float:
        """Share of '7' characters in an 8-character budget."""
        return output.count("7") / 8


def _trainer(tmp_path, overrides, backend=None):
    tok = char_tokenizer()
    cfg = load_config(
        None,
        [
            "sampling.max_new_tokens=8",
            "trainer.batch_size=4",
            "trainer.lr=3e-3",
            "algorithm.group_size=4",
            f"log.run_dir={tmp_path}",
            "log.progress=false",
            *overrides,
        ],
    )
    entries = load_rows([{"prompt": f"{i}+{i}=", "rewards": "toy_sevens_vllm"} for i in range(8)])
    adapter = TextAdapter(tok, cfg.sampling)
    if backend is not None:
        backend = backend(adapter)
    model = tiny_vllm_llama(len(tok))
    return Trainer(cfg, model, adapter, entries, backend=backend)


def test_grpo_with_vllm_rollouts_learns(engine, tmp_path):
    over = ["trainer.steps=30", "algorithm.grpo_iters=2", "trainer.iterations=3"]
    tr = _trainer(tmp_path, over, backend=lambda a: VllmBackend(engine, a.sampling))
    hist = tr.train()
    assert engine.version == tr.updates - 2  # pushed before each rollout (not after the last)
    first = sum(h["reward/mean"] for h in hist[:5]) / 5
    last = sum(h["reward/mean"] for h in hist[-5:]) / 5
    assert last > first + 0.3, (first, last)
    # fp32 engine, fp32 trainer: the first pass is on-policy to float noise
    assert max(h["sampling/logp_diff/max"] for h in hist) <= 1e-4
    assert tr.cfg.algorithm.is_correction is None


@pytest.fixture(scope="module")
def bf16_server(tiny_dir, tmp_path_factory):
    """A bf16 engine in a server process: a second engine in this process would share (and on
    teardown break) vLLM's process-global parallel state with the session's engine."""
    port = free_port()
    log = tmp_path_factory.mktemp("bf16_server") / "log.txt"
    args = ("--dtype", "bfloat16", "--kv-cache-gb", "1", "--max-model-len", "256")
    proc, _ = spawn_server(sys.executable, tiny_dir, port, str(log), args)
    yield port
    proc.kill()
    proc.wait()


def test_bf16_server_turns_is_correction_on_and_logs_the_gap(bf16_server, tmp_path):
    """A GRPO run in server mode with a bf16 engine under the fp32 trainer."""
    over = [
        "trainer.steps=2",
        "rollout.backend=vllm",
        "rollout.vllm_mode=server",
        f"rollout.port={bf16_server}",
        "rollout.dtype=bfloat16",
    ]
    tr = _trainer(tmp_path, over)
    assert tr.backend.name == "vllm" and tr.backend.engine.health["dtype"] == "bfloat16"
    assert tr.cfg.algorithm.is_correction == "token_truncate"
    hist = tr.train()
    assert tr.backend.engine.call("health")["version"] == tr.updates - 1
    for h in hist:
        # bf16 log-probs of a peaked tiny model differ from fp32 visibly, but not wildly
        assert 1e-3 < h["sampling/logp_diff/mean"] < 1.0
        assert h["sampling/logp_diff/max"] >= h["sampling/logp_diff/mean"]
        lo, mid, hi = (h[f"sampling/is_ratio/{k}"] for k in ("min", "mean", "max"))
        assert 0 < lo < 1 < hi and lo <= mid <= hi
        assert 0 < h["is_weight"] <= 3.0  # the truncated IS weight was applied
    assert torch.isfinite(torch.tensor(hist[-1]["loss"]))


def test_one_step_async_learns_with_stale_rollouts(engine, tmp_path):
    """async_steps = 1: each rollout after the first was sampled from the weights one step
    older (its policy_version), the IS correction is on, and the run still learns."""
    from grpo_ar.generation.async_backend import OneStepAhead

    over = [
        "trainer.steps=30",
        "algorithm.grpo_iters=2",
        "trainer.iterations=3",
        "rollout.backend=vllm",
        "rollout.async_steps=1",
    ]
    tr = _trainer(tmp_path, over, backend=lambda a: OneStepAhead(VllmBackend(engine, a.sampling)))
    assert tr.cfg.algorithm.is_correction == "token_truncate"
    versions = []
    step = tr.train_step

    def recording_step():
        before = tr.updates
        out = step()
        versions.append((before, tr.last_rollout.extras["policy_version"]))
        return out

    tr.train_step = recording_step
    hist = tr.train()
    assert versions[0] == (0, 0)  # nothing to prefetch before the first step
    assert all(v == before - 2 for before, v in versions[1:])  # one step (2 updates) behind
    assert tr.backend.ahead_s > 0
    first = sum(h["reward/mean"] for h in hist[:5]) / 5
    last = sum(h["reward/mean"] for h in hist[-5:]) / 5
    assert last > first + 0.3, (first, last)
    # stale rollouts: the trainer's first-pass log-probs differ from the sampler's
    assert max(h["sampling/logp_diff/max"] for h in hist[1:]) > 1e-3
    assert all(0 < h["is_weight"] <= 3.0 for h in hist)


def test_multiturn_adapter_with_rollout_backend_vllm_in_the_config(bf16_server, tmp_path):
    """`rollout.backend = "vllm"` (server mode) with a multi-turn adapter: build_backend hands
    the adapter to the vLLM backend, which samples trajectories (not single completions) that
    the run trains on; the environment's tokens are outside the gap metrics' mask."""
    from test_vllm_multiturn import Counter

    from grpo_ar.adapters.multiturn import MultiTurnAdapter

    tok = char_tokenizer()
    cfg = load_config(
        None,
        [
            "sampling.max_new_tokens=6",
            f"sampling.eos_token_ids={list(range(2, 24))}",
            "trainer.steps=2",
            "trainer.batch_size=2",
            "algorithm.group_size=4",
            "data.rewards=[{name: environment}]",
            f"log.run_dir={tmp_path}",
            "log.progress=false",
            "rollout.backend=vllm",
            "rollout.vllm_mode=server",
            f"rollout.port={bf16_server}",
            "rollout.dtype=bfloat16",
        ],
    )
    adapter = MultiTurnAdapter(TextAdapter(tok, cfg.sampling), Counter(max_turns=3, max_tokens=40))
    entries = load_rows(
        [{"prompt": f"{i}+{i}="} for i in range(4)], default_rewards=cfg.data.rewards
    )
    tr = Trainer(cfg, tiny_vllm_llama(len(tok)), adapter, entries)
    assert tr.backend.name == "vllm" and tr.backend.turns is adapter
    hist = tr.train()
    r = tr.last_rollout
    assert r is not None and (r.data["turns"] > 1).any()
    assert (r.sampling_logp[~r.model_mask.bool()] == 0).all()
    for h in hist:
        assert h["turns/mean"] > 1.0 and 0 < h["turns/env_token_frac"] < 1
        assert 1e-3 < h["sampling/logp_diff/mean"] < 1.0  # bf16 engine, fp32 trainer
