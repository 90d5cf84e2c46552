"""In-process pieces of the torchrun path (grpo_ar/parallel/ddp.py, grpo_ar/parallel/fsdp.py): seeds,
prompt shards, strategy and config refusals, the exchange's error path, FSDP2 width alignment.
The multi-rank behaviour itself: tests/test_distributed.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from grpo_ar.config import ConfigError, load_config
from grpo_ar.parallel.ddp import (
    DataParallel,
    derive_seed,
    resolve_strategy,
    shard_prompts,
    shard_rows,
)
from grpo_ar.types import Entry, PromptBatch


def test_step_zero_samples_from_the_run_seed_and_streams_differ():
    assert derive_seed(7, 0, 0) == 7  # the first draw of a run is the run seed, as before
    seeds = {derive_seed(7, s, r) for s in range(50) for r in (-2, -1, 0, 1, 2)}
    assert len(seeds) == 250


def test_shards_are_whole_prompt_blocks_with_the_global_padding():
    ids = torch.tensor([[0, 0, 5], [0, 6, 7], [8, 9, 4], [0, 0, 3]])
    pb = PromptBatch(ids, (ids > 0).long(), [Entry(i, ()) for i in range(4)])
    assert [shard_rows(4, r, 2) for r in (0, 1)] == [(0, 2), (2, 2)]
    part = shard_prompts(pb, 2, 2)
    assert torch.equal(part.input_ids, ids[2:])  # no re-trimming: the numerics of one batch
    assert part.extras["shard"] == (2, 4) and [e.prompt for e in part.entries] == [2, 3]
    with pytest.raises(ConfigError, match="multiple of the world size 3"):
        shard_rows(4, 0, 3)


def test_strategies_without_torchrun_are_refused_with_the_command(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_strategy("auto") == "none"
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node=N"):
        resolve_strategy("fsdp2")
    with pytest.raises(ConfigError, match="use auto, none, ddp, fsdp2"):
        resolve_strategy("deepspeed")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_strategy("auto") == "ddp"
    with pytest.raises(ConfigError, match="unsynchronised copies"):
        resolve_strategy("none")


def test_config_strategy_field():
    assert load_config(None, []).trainer.strategy == "auto"
    assert load_config(None, ["trainer.strategy=fsdp2"]).trainer.strategy == "fsdp2"
    with pytest.raises(ConfigError, match="trainer.strategy='fsdp': use auto, none, ddp, fsdp2"):
        load_config(None, ["trainer.strategy=fsdp"])


@pytest.fixture
def group(tmp_path):
    """A one-process gloo group in this process (destroyed afterwards)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp2_refuses_token_budgets_and_adapters(group):
    from grpo_ar.parallel.fsdp import FSDP2Parallel

    par = FSDP2Parallel()
    par.check(load_config(None, ["trainer.batch_size=4"]))
    with pytest.raises(ConfigError, match="micro_batch_tokens with strategy=fsdp2"):
        par.check(load_config(None, ["trainer.micro_batch_tokens=64"]))
    with pytest.raises(ConfigError, match="adapters train under strategy=ddp"):
        par.check(load_config(None, ["finetune.method=peft"]))


def test_exchange_reraises_a_local_error(group):
    ids = torch.tensor([[1, 2]])
    pb = PromptBatch(ids, torch.ones_like(ids), [Entry(0, ())])

    def fail(prompts):
        raise KeyError("judge down")

    with pytest.raises(KeyError, match="judge down"):
        DataParallel().scored(pb, fail, pad=0)
    assert DataParallel().all_true(True) and not DataParallel().all_true(False)


def test_widen_pads_completions_with_mask_zero():
    from grpo_ar.parallel.fsdp import widen
    from grpo_ar.types import Rollout

    ids = torch.tensor([[1, 2]])
    pb = PromptBatch(ids, torch.ones_like(ids), [Entry(0, ())])
    r = Rollout(
        pb, 2, torch.tensor([[5], [6]]), torch.ones(2, 1), torch.full((2, 1), -0.5),
        torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.long),
        torch.zeros(2, dtype=torch.long), data={"adv": torch.ones(2), "tok": torch.ones(2, 1)},
    )  # fmt: skip
    w = widen(r, 3)
    assert w.completion_ids.shape == (2, 3) and w.completion_mask[:, 1:].eq(0).all()
    assert torch.equal(w.completion_ids[:, :1], r.completion_ids)
    assert w.data["adv"].shape == (2,) and w.data["tok"].shape == (2, 3)
    assert w.sampling_logp[:, 1:].eq(0).all()


def test_dynamic_sampling_keeps_what_the_sampler_recorded():
    """fill_batch (as the exchange) keeps extras such as the CFG scale an image adapter checks
    before training on a rollout; it used to drop them with the joined batch."""
    from grpo_ar.rewards.base import RewardResult
    from grpo_ar.train.dynamic_sampling import fill_batch
    from grpo_ar.types import Rollout

    def rollout(rewards):
        ids = torch.tensor([[1, 2], [3, 4]])
        pb = PromptBatch(ids, torch.ones_like(ids), [Entry(0, ()), Entry(1, ())])
        n = 4
        r = Rollout(
            pb, 2, torch.arange(n)[:, None], torch.ones(n, 1), torch.zeros(n, 1),
            torch.zeros(n, dtype=torch.bool), torch.arange(n) // 2, torch.arange(n) // 2,
        )  # fmt: skip
        r.extras = {"outputs": [str(x) for x in rewards], "cfg_scale": 3.0}
        t = torch.tensor(rewards)
        res = RewardResult(
            t, t[:, None], torch.ones(n, 1), torch.ones(n, 1, dtype=torch.bool), ["r"], {}
        )
        return r, res

    first = rollout([1.0, 1.0, 0.0, 1.0])  # group 0 has no spread
    joined, result, info = fill_batch(*first, 2, 3, lambda: rollout([0.0, 1.0, 2.0, 2.0]), 0)
    assert joined.extras["cfg_scale"] == 3.0 and info["dynamic/rounds"] == 2
    assert joined.extras["outputs"] == ["0.0", "1.0", "0.0", "1.0"]
    assert result.total.tolist() == [0.0, 1.0, 0.0, 1.0]
