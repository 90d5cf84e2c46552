"""The trainer's accelerator path (`Trainer.sync_free`): finiteness and token statistics kept
on the device, read once per pass / step. Run here on the CPU by switching the flag: the same
arithmetic must give the same step, and a NaN pass must still be skipped."""

import pytest
import torch
from test_precision import SGD, make

from grpo_ar.core import LOSSES, PolicyLoss


def _run(tmp_path, sync_free, overrides=()):
    tr = make(tmp_path, "fp32", [*SGD, "trainer.lr=0.1", "trainer.grad_accum=2", *overrides])
    tr.sync_free = sync_free
    metrics = tr.train_step()
    return tr, metrics


def test_the_sync_free_path_takes_the_same_step(tmp_path):
    a, ma = _run(tmp_path / "a", False)
    b, mb = _run(tmp_path / "b", True)
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n
    for k in ("loss", "entropy", "clip/low", "tokens/kept", "grad_norm"):
        assert ma[k] == mb[k], k


@pytest.fixture
def nan_loss():
    def toy_nan_loss_hs(logp, old_logp, adv, mask):
        z = torch.zeros_like(logp)
        return PolicyLoss(logp * float("nan"), z, z)

    LOSSES.register("toy_nan_loss_hs")(toy_nan_loss_hs)
    yield "toy_nan_loss_hs"
    LOSSES._fns.pop("toy_nan_loss_hs")


def test_a_nan_pass_is_skipped_without_per_micro_batch_checks(tmp_path, nan_loss):
    tr, m = _run(tmp_path, True, [f"algorithm.loss={nan_loss}"])
    assert m["skipped_updates"] == 1 and tr.updates == 0
    assert "loss" not in m
    assert m["entropy"] == 0.0  # its micro-batches' statistics were dropped on the device
