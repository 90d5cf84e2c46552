import math

import pytest
import torch

from grpo_ar.core.kl import KL


def test_hand_computed():
    logp = torch.tensor([[math.log(0.5), math.log(0.2)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.2)]])
    # log(ref/π) = log(0.5), 0
    lr = math.log(0.5)
    torch.testing.assert_close(KL["k1"](logp, ref), torch.tensor([[-lr, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        KL["k2"](logp, ref), torch.tensor([[0.5 * lr**2, 0.0]]), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        KL["k3"](logp, ref), torch.tensor([[0.5 - lr - 1, 0.0]]), atol=1e-6, rtol=0
    )


def test_k3_unbiased_for_true_kl():
    # E_{x~π}[k3] = KL(π || π_ref); exact expectation over a small categorical
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    expectation = (p * KL["k3"](p.log(), q.log())).sum()
    torch.testing.assert_close(expectation, (p * (p / q).log()).sum(), atol=1e-12, rtol=0)
    expectation_k1 = (p * KL["k1"](p.log(), q.log())).sum()
    torch.testing.assert_close(expectation_k1, (p * (p / q).log()).sum(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", sorted(KL))
def test_clamp_keeps_collapsed_tokens_finite(name):
    logp = torch.tensor([[-1e4, 0.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -1e4]])
    out = KL[name](logp, ref)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(logp.grad).all()


@pytest.mark.parametrize("name", sorted(KL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_sweep_nonneg_where_expected(name, dtype):
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 9, generator=g).to(dtype) * 3
    ref = -torch.rand(4, 9, generator=g).to(dtype) * 3
    out = KL[name](logp, ref)
    assert out.shape == (4, 9) and out.dtype == dtype and torch.isfinite(out).all()
    if name != "k1":
        assert (out >= 0).all()
    assert torch.equal(KL[name](logp, logp), torch.zeros_like(logp))
