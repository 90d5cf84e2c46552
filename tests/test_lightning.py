"""The seed's Lightning design (grpo_ar.parallel.lightning) equals the plain Trainer: one
process (in pytest) and two CPU ranks (`strategy="ddp"` under one torchrun launch; this file is
also the worker: `python -m torch.distributed.run --nproc_per_node=2 tests/test_lightning.py
OUT`) give the plain one-process run's losses, rewards and final weights."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
sys.path.insert(0, str(Path(__file__).parent))

from test_distributed import BASE, KEEP, assert_same_run, weights  # noqa: E402

from grpo_ar.adapters.text import TextAdapter  # noqa: E402
from grpo_ar.config import load_config  # noqa: E402
from grpo_ar.io.data import load_rows  # noqa: E402
from grpo_ar.train.trainer import Trainer  # noqa: E402
from tiny import char_tokenizer, tiny_llama  # noqa: E402

RUNS = {  # reference refresh, adaptive entropy, batch-std scaling: all through the core
    "token_mean": ["algorithm.entropy_coef=0.01", "algorithm.entropy_target=5.0"],
    "seq_mean_token_mean": [
        "algorithm.aggregation=seq_mean_token_mean",
        "algorithm.advantage_args={scale: batch}",
    ],
    "peft": ["finetune.method=peft", "finetune.rank=4"],
}


def build(run_dir, name):
    tok = char_tokenizer()
    cfg = load_config(None, [*BASE, f"log.run_dir={run_dir}", *RUNS[name]])
    rows = [{"prompt": f"{i}+{i}="} for i in range(16)]
    entries = load_rows(rows, default_rewards=cfg.data.rewards)
    return cfg, tiny_llama(vocab_size=len(tok)), TextAdapter(tok, cfg.sampling), entries


def fit(run_dir, name, **trainer_kw):
    import lightning.pytorch as pl

    from grpo_ar.parallel.lightning import GRPOModule

    module = GRPOModule(*build(run_dir, name))
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)
    pl.Trainer(
        accelerator="cpu", max_epochs=1, enable_checkpointing=False, **quiet, **trainer_kw
    ).fit(module)
    return module


def rows(hist):
    return [{k: h[k] for k in KEEP if k in h} for h in hist]


def worker(out: Path) -> None:
    torch.set_num_threads(1)
    for name in RUNS:
        module = fit(out / name, name, devices=2, strategy="ddp")
        w = weights(module.core)
        if module.core.dist.rank == 0:
            torch.save({"hist": rows(module.history), "weights": w}, out / f"{name}.pt")


_REFS: dict = {}


def plain(name, tmp_path_factory):
    """The plain Trainer, one process, same config."""
    if name not in _REFS:
        tr = Trainer(*build(tmp_path_factory.mktemp(name), name))
        hist = tr.train()
        _REFS[name] = (hist, weights(tr))
    return _REFS[name]


@pytest.mark.parametrize("name", list(RUNS))
def test_lightning_one_process_equals_the_plain_trainer(tmp_path, tmp_path_factory, name):
    """μ = 2 passes of 2 accumulated sub-batches per step, 4 steps, one process: the Lightning
    module's losses, rewards, KL, entropy and weights are the plain Trainer's, bitwise here."""
    module = fit(tmp_path, name, devices=1)
    hist, w = plain(name, tmp_path_factory)
    got = weights(module.core)
    assert_same_run({"hist": rows(module.history), "weights": got}, hist, w)
    assert all(torch.equal(got[k], w[k]) for k in w)  # the same ops in the same order
    assert len(module.history) == 4
    assert (tmp_path / "checkpoints" / "latest").exists()  # grpo_ar's own checkpoint


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    out = tmp_path_factory.mktemp("lightning")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    start = time.perf_counter()
    proc = subprocess.run(
        [*cmd, __file__, str(out)], env=env, capture_output=True, text=True, timeout=420
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    print(f"2-rank Lightning launch: {time.perf_counter() - start:.1f} s")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_lightning_two_cpu_ranks_equal_the_plain_trainer(launch, tmp_path_factory, name):
    """Lightning strategy="ddp" on 2 CPU ranks (per-rank sharding in the dataset, hand
    accumulation under block_backward_sync) = the plain one-process Trainer."""
    hist, w = plain(name, tmp_path_factory)
    assert_same_run(torch.load(launch / f"{name}.pt"), hist, w)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
