"""torchrun data parallelism equals one process: 2-rank DDP and FSDP2 runs (CPU, gloo) of a tiny
Llama give the one-process losses, rewards and final weights for the same global batch; their
checkpoints resume in one process and in FSDP2; peft and LyCORIS train under DDP; a rank whose
rewards raise stops every rank with the error.

All 2-rank runs share ONE torchrun launch (this file is also the worker:
`python -m torch.distributed.run --nproc_per_node=2 tests/test_distributed.py OUT`); each
launch costs seconds of imports. The one-process references run in the pytest process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from grpo_ar.adapters.text import TextAdapter  # noqa: E402
from grpo_ar.config import load_config  # noqa: E402
from grpo_ar.io.data import load_rows  # noqa: E402
from grpo_ar.rewards import REWARDS, RewardComputer, per_sample, register_reward  # noqa: E402
from grpo_ar.train.trainer import Trainer  # noqa: E402
from tiny import char_tokenizer, tiny_llama  # noqa: E402

if "dist_len" not in REWARDS:

    @register_reward("dist_len")
    @per_sample
    def dist_len(output: str) -> float:
        """Toy reward with spread: the completion's length in characters."""
        return float(len(output))

    @register_reward("dist_long")
    @per_sample
    def dist_long(output: str) -> float:
        """Toy 0/1 reward: groups where every completion is long (or short) have no spread."""
        return float(len(output) >= 5)


# many stop tokens: rows end at different steps, so ranks sample different lengths
EOS = "[" + ",".join(str(i) for i in [2, *range(3, 40)]) + "]"
BASE = [
    "sampling.max_new_tokens=8",
    f"sampling.eos_token_ids={EOS}",
    "trainer.steps=4",
    "trainer.iterations=2",  # the reference is refreshed after steps 2 and 4
    "trainer.batch_size=4",
    "trainer.grad_accum=2",
    "trainer.lr=3e-3",
    # Adam eps: the default 1e-8 turns fp32 noise in ~0 gradients into O(lr) weight differences
    "trainer.optimizer_args={eps: 1e-4}",
    "trainer.save_every=2",
    "algorithm.group_size=4",
    "algorithm.grpo_iters=2",
    "algorithm.beta=0.04",
    "log.progress=false",
    "log.keep_checkpoints=0",
    "data.rewards=[{name: dist_len}]",
]
AGG = "algorithm.aggregation="
SCENARIOS = {
    "ddp_token_mean": ["trainer.strategy=ddp", AGG + "token_mean"],
    "ddp_seq_mean_token_mean": ["trainer.strategy=ddp", AGG + "seq_mean_token_mean"],
    "fsdp2_token_mean": ["trainer.strategy=fsdp2", AGG + "token_mean"],
    "fsdp2_seq_mean_token_mean": ["trainer.strategy=fsdp2", AGG + "seq_mean_token_mean"],
    # batch-level statistics on the global batch: DAPO dynamic sampling, batch-std scaling,
    # adaptive entropy bonus (its window summed over ranks), GDPO, ReMax's sharded greedy baseline
    "ddp_dapo_batch": [
        "trainer.strategy=ddp",
        "algorithm.dynamic_sampling=true",
        "data.rewards=[{name: dist_long}]",
        "algorithm.advantage_args={scale: batch}",
        "algorithm.mask_truncated_completions=true",
        "algorithm.entropy_coef=0.01",
        "algorithm.entropy_target=5.0",
    ],
    "ddp_gdpo": [
        "trainer.strategy=ddp",
        "algorithm.multi_objective=normalize_then_sum",
        AGG + "seq_mean_token_sum_norm",  # Dr. GRPO's constant normaliser
        "data.rewards=[{name: dist_len}, {name: dist_long, weight: 2.0}]",
    ],
    "fsdp2_remax_soft_sync": [  # + TR-DPO soft reference sync on the sharded reference
        "trainer.strategy=fsdp2",
        "algorithm.advantage=remax",
        AGG + "seq_mean_token_sum",
        "algorithm.reference_refresh=soft",
        "algorithm.reference_sync_every=3",
        "algorithm.reference_mix_alpha=0.5",
    ],
    "ddp_peft": ["trainer.strategy=ddp", "finetune.method=peft", "finetune.rank=4"],
    "ddp_lycoris": ["trainer.strategy=ddp", "finetune.method=lycoris", "finetune.rank=4"],
}


KEEP = ("loss", "reward/mean", "kl", "entropy", "grad_norm", "entropy_coef", "dynamic/rounds")


def make(run_dir, overrides, rewards=None):
    tok = char_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    cfg = load_config(None, [*BASE, f"log.run_dir={run_dir}", *overrides])
    rows = [{"prompt": f"{i}+{i}="} for i in range(16)]
    entries = load_rows(rows, default_rewards=cfg.data.rewards)
    return Trainer(cfg, model, TextAdapter(tok, cfg.sampling), entries, rewards=rewards)


def one_process(overrides):
    return [o.replace("=ddp", "=none").replace("=fsdp2", "=none") for o in overrides]


def weights(tr):
    w = tr.dist.policy_weights(tr.finetune)
    return {
        k: v.detach().cpu().clone()
        for k, v in (w if isinstance(w, dict) else w.state_dict()).items()
    }


def copy_checkpoint(src_run, step, dst_run):
    """A run directory whose latest checkpoint is `src_run`'s checkpoint at `step`."""
    name = f"step_{step:06d}"
    (dst_run / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copytree(src_run / "checkpoints" / name, dst_run / "checkpoints" / name)
    (dst_run / "checkpoints" / "latest").write_text(name)


# -- the worker (every rank) ----------------------------------------------------------------------
class FailOnRank1(RewardComputer):
    def __call__(self, outputs, ctx):
        import torch.distributed as dist

        if dist.get_rank() == 1:
            raise ValueError("bad reward on rank 1")
        return super().__call__(outputs, ctx)


def worker(out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def run(name, overrides, resume_from=None):
        tr = make(out / name, overrides)
        widths, sample = [], tr.adapter.sample

        def spy(model, prompts, g, **kw):
            r = sample(model, prompts, g, **kw)
            widths.append(r.completion_ids.shape[1])
            return r

        tr.adapter.sample = spy
        if resume_from is not None:
            tr.resume()
        hist = tr.train()
        w = weights(tr)
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, widths)
        if rank == 0:
            rows = [{k: h[k] for k in KEEP if k in h} for h in hist]
            torch.save({"hist": rows, "weights": w, "widths": every}, out / f"{name}.pt")

    for name, overrides in SCENARIOS.items():
        run(name, overrides)
    if rank == 0:  # a 2-rank DDP checkpoint resumed by 2 FSDP2 ranks
        copy_checkpoint(out / "ddp_token_mean", 2, out / "fsdp2_resumed")
    dist.barrier()
    run("fsdp2_resumed", SCENARIOS["fsdp2_token_mean"], resume_from=True)

    from grpo_ar.cli import main  # `grpo-ar train` under torchrun (strategy auto = ddp)

    assert main(["train", str(out / "cli.toml"), "--set", f"log.run_dir={out / 'cli_run'}"]) == 0

    tr = make(out / "failing", ["trainer.strategy=ddp"], rewards=FailOnRank1(names=["dist_len"]))
    try:
        tr.train_step()
        (out / f"error_rank{rank}.txt").write_text("no error")
    except Exception as e:
        (out / f"error_rank{rank}.txt").write_text(f"{type(e).__name__}: {e}")
    dist.barrier()
    dist.destroy_process_group()


# -- the tests (pytest process) ------------------------------------------------------------------
def write_cli_inputs(out: Path) -> None:
    """A saved tiny Llama, a JSONL dataset and a TOML config for `grpo-ar train`."""
    tok = char_tokenizer()
    tiny_llama(vocab_size=len(tok)).save_pretrained(out / "cli_model")
    tok.save_pretrained(out / "cli_model")
    rows = [{"prompt": f"{i}+{i}=", "rewards": "dist_len"} for i in range(16)]
    (out / "cli.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "cli.toml").write_text(
        f"""
[model]
path = "{out / "cli_model"}"
device = "cpu"
[sampling]
max_new_tokens = 8
eos_token_ids = {EOS}
[algorithm]
group_size = 4
[trainer]
steps = 2
batch_size = 4
lr = 3e-3
optimizer_args = {{eps = 1e-4}}
[data]
train = "{out / "cli.jsonl"}"
[log]
progress = false
report_to = ["tensorboard"]
"""
    )


def launch_two_ranks(script: str, out: Path, timeout: float) -> Path:
    """Run `script OUT` as 2 torchrun ranks (gloo, 1 thread each); fails with the tail of the
    ranks' output unless both end cleanly. Returns `out`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += ["--standalone", script, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    took = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    print(f"2-rank launch of {Path(script).name}: {took:.1f} s")
    return out


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    write_cli_inputs(out)
    return launch_two_ranks(__file__, out, timeout=420)


_REFS: dict = {}


def reference(name, tmp_path_factory):
    """The one-process run of a scenario (same global batch), computed once."""
    if name not in _REFS:
        tr = make(tmp_path_factory.mktemp(name), one_process(SCENARIOS[name]))
        hist = tr.train()
        _REFS[name] = (hist, weights(tr), tr.run_dir)
    return _REFS[name]


def assert_same_run(got, hist, w, start=0):
    assert len(got["hist"]) == len(hist) - start
    for mine, ref in zip(got["hist"], hist[start:]):
        assert {k for k in KEEP if k in mine} == {k for k in KEEP if k in ref}
        for k in ("reward/mean", "dynamic/rounds", "entropy_coef"):  # the same samples
            assert mine.get(k) == ref.get(k), k
        for k in ("loss", "kl", "entropy", "grad_norm"):
            assert abs(mine[k] - ref[k]) <= 1e-6 * max(1.0, abs(ref[k])), (k, mine[k], ref[k])
    assert set(got["weights"]) == set(w)
    worst = max(float((got["weights"][k] - w[k]).abs().max()) for k in w)
    assert worst <= 1e-6, worst


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_equal_one_process(launch, tmp_path_factory, name):
    """Losses, KL, entropy, grad norms, rewards per step and final weights of the 2-rank run
    (DDP / FSDP2 × token_mean / seq_mean_token_mean; peft and LyCORIS under DDP) equal the
    one-process run with the same global batch."""
    hist, w, _ = reference(name, tmp_path_factory)
    assert_same_run(torch.load(launch / f"{name}.pt"), hist, w)
    if name == "ddp_dapo_batch":  # the scenario really resampled and moved the coefficient
        assert max(h["dynamic/rounds"] for h in hist) > 1
        assert len({h["entropy_coef"] for h in hist}) > 1


@pytest.mark.slow
def test_fsdp2_ranks_sampled_different_lengths(launch):
    """The FSDP2 runs above finished although ranks generated different lengths."""
    for name in ("fsdp2_token_mean", "fsdp2_seq_mean_token_mean"):
        per_rank = torch.load(launch / f"{name}.pt")["widths"]
        assert any(a != b for a, b in zip(*per_rank)), per_rank


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp_token_mean", "fsdp2_token_mean", "ddp_lycoris"])
def test_two_rank_checkpoint_resumes_in_one_process(launch, tmp_path, tmp_path_factory, name):
    """Saved by 2 ranks at step 2 (FSDP2: gathered full state dicts, optimizer moments too),
    resumed by one process: steps 3-4 and the final weights are the uninterrupted run's."""
    hist, w, _ = reference(name, tmp_path_factory)
    copy_checkpoint(launch / name, 2, tmp_path / "run")
    tr = make(tmp_path / "run", one_process(SCENARIOS[name]))
    tr.resume()
    rest = tr.train()
    got = {"hist": rest, "weights": weights(tr)}
    assert_same_run(got, hist, w, start=2)


@pytest.mark.slow
def test_ddp_checkpoint_resumes_in_fsdp2(launch, tmp_path_factory):
    """The 2-rank DDP checkpoint of step 2, loaded into sharded FSDP2 ranks, continues as the
    uninterrupted one-process run."""
    hist, w, _ = reference("fsdp2_token_mean", tmp_path_factory)
    assert_same_run(torch.load(launch / "fsdp2_resumed.pt"), hist, w, start=2)


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank_with_its_error(launch):
    """Rank 1's reward computer raises; both ranks raise (rank 0 names rank 1's error) instead
    of rank 0 waiting forever in the exchange; the launch returned (bounded by its timeout)."""
    assert (launch / "error_rank1.txt").read_text() == "ValueError: bad reward on rank 1"
    msg = (launch / "error_rank0.txt").read_text()
    assert msg.startswith("RunError: rank 1 failed") and "bad reward on rank 1" in msg


@pytest.mark.slow
def test_cli_train_under_torchrun_equals_one_process(launch, tmp_path):
    """`grpo-ar train CONFIG` under torchrun (2 ranks, strategy auto = ddp): rank 0 alone writes
    metrics (one line per step), TensorBoard events and checkpoints; the weights are the
    one-process CLI run's."""
    from grpo_ar.cli import main
    from grpo_ar.io.checkpoint import latest_checkpoint, load_tensors

    assert main(["train", str(launch / "cli.toml"), "--set", f"log.run_dir={tmp_path}"]) == 0
    two = launch / "cli_run"
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 2
    assert len(list((two / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0's
    a = load_tensors(latest_checkpoint(two) / "model.safetensors")
    b = load_tensors(latest_checkpoint(tmp_path) / "model.safetensors")
    assert set(a) == set(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
