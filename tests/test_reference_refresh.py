"""REFERENCE_REFRESH: each policy's hooks on a real FrozenCopy of a small module (the trainer
calls every hook; the entry decides which one moves the reference)."""

import pytest
import torch

from grpo_ar.train.reference import REFERENCE_REFRESH, FrozenCopy


def models():
    policy = torch.nn.Linear(3, 2)
    ref = FrozenCopy(policy)
    ref0 = {k: v.clone() for k, v in ref.model.state_dict().items()}
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    return policy, ref, ref0


def same(ref, want):
    return all(torch.equal(v, want[k]) for k, v in ref.model.state_dict().items())


def test_registry_holds_the_config_names():
    assert sorted(REFERENCE_REFRESH) == ["iteration", "never", "soft"]


def test_iteration_refreshes_at_iteration_end_only():
    policy, ref, ref0 = models()
    rp = REFERENCE_REFRESH["iteration"](mix_alpha=0.5, sync_every=1)
    rp.check(ref)
    rp.after_update(ref, policy, 1)
    assert same(ref, ref0)
    rp.after_iteration(ref, policy)
    assert same(ref, policy.state_dict())


def test_never_keeps_the_initial_reference():
    policy, ref, ref0 = models()
    rp = REFERENCE_REFRESH["never"](mix_alpha=0.5, sync_every=1)
    rp.check(ref)
    rp.after_update(ref, policy, 1)
    rp.after_iteration(ref, policy)
    assert same(ref, ref0)


def test_soft_mixes_every_sync_every_updates():
    policy, ref, ref0 = models()
    rp = REFERENCE_REFRESH["soft"](mix_alpha=0.25, sync_every=2)
    rp.check(ref)
    rp.after_update(ref, policy, 1)
    rp.after_iteration(ref, policy)  # an iteration end does not move a soft reference
    assert same(ref, ref0)
    rp.after_update(ref, policy, 2)
    pol = policy.state_dict()
    for k, v in ref.model.state_dict().items():  # θ_ref = 0.25·θ + 0.75·θ_ref0
        torch.testing.assert_close(v, 0.25 * pol[k] + 0.75 * ref0[k], atol=1e-6, rtol=0)


def test_only_soft_checks_its_mix_at_start_up():
    _, ref, _ = models()
    with pytest.raises(ValueError, match=r"reference mix alpha=1.5: need 0 < alpha <= 1"):
        REFERENCE_REFRESH["soft"](mix_alpha=1.5, sync_every=1).check(ref)
    REFERENCE_REFRESH["iteration"](mix_alpha=1.5, sync_every=1).check(ref)  # never mixes
