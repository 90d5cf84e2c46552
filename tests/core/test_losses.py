import math

import pytest
import torch

from grpo_ar.core.losses import LOSSES


def _inputs(seed=0, n=6, t=8, dtype=torch.float64, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=g, dtype=dtype) * 3
    old = logp + torch.randn(n, t, generator=g, dtype=dtype) * spread
    adv = torch.randn(n, generator=g, dtype=dtype)
    mask = torch.ones(n, t, dtype=dtype)
    for i in range(n):
        mask[i, int(torch.randint(1, t + 1, (1,), generator=g)) :] = 0
    return logp, old, adv, mask


def test_clip_hand_computed():
    # ratios 1.5 (A=+1, clipped to 1.2), 0.5 (A=-1, clipped to 0.8 -> loss 0.8), 1.1 (A=+1, inside)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]], dtype=torch.float64))
    old = torch.zeros(1, 3, dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, 1.0]], dtype=torch.float64)
    out = LOSSES["clip"](logp, old, adv, torch.ones(1, 3))
    torch.testing.assert_close(
        out.loss, torch.tensor([[-1.2, 0.8, -1.1]], dtype=torch.float64), atol=1e-6, rtol=0
    )
    assert out.clipped_high.tolist() == [[1.0, 0.0, 0.0]]
    assert out.clipped_low.tolist() == [[0.0, 1.0, 0.0]]


def test_dual_clip_hand_computed():
    # A = -1, ratio 5: plain clip gives max(5, 1.2) = 5; dual clip c = 3 bounds it at 3
    logp = torch.log(torch.tensor([[5.0, 5.0]], dtype=torch.float64))
    adv = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)
    out = LOSSES["clip"](logp, torch.zeros_like(logp), adv, torch.ones(1, 2), dual_clip=3.0)
    torch.testing.assert_close(
        out.loss, torch.tensor([[3.0, -1.2]], dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_gspo_hand_computed():
    # one sequence, token log-ratios log 2 and log 0.5 plus a masked garbage token: s = 1
    logp = torch.tensor([[math.log(2), math.log(0.5), 50.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    out = LOSSES["gspo"](
        logp, torch.zeros_like(logp), torch.tensor([2.0], dtype=torch.float64), mask
    )
    torch.testing.assert_close(
        out.loss, torch.full((1, 3), -2.0, dtype=torch.float64), atol=1e-6, rtol=0
    )


def test_cispo_hand_computed_and_detached_weight():
    logp = torch.log(torch.tensor([[7.0, 0.5]], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    out = LOSSES["cispo"](
        logp, torch.zeros(1, 2, dtype=torch.float64), adv, torch.ones(1, 2), max_weight=5.0
    )
    expected = -torch.tensor([[5.0, 0.5]], dtype=torch.float64) * adv * logp.detach()
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=0)
    out.loss.sum().backward()
    # gradient is -w·A: the weight is a constant, even where it is clipped
    torch.testing.assert_close(
        logp.grad, torch.tensor([[-5.0, -1.0]], dtype=torch.float64), atol=1e-6, rtol=0
    )
    assert out.clipped_high.tolist() == [[1.0, 0.0]]


def naive_clip(logp, old, adv, eps_low, eps_high):
    out = torch.zeros_like(logp)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            r = math.exp(logp[i, t] - old[i, t])
            a = float(adv[i])
            out[i, t] = -min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
    return out


def test_clip_matches_naive_loop():
    logp, old, adv, mask = _inputs(spread=0.5)
    out = LOSSES["clip"](logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(out.loss, naive_clip(logp, old, adv, 0.2, 0.28), atol=1e-6, rtol=0)


def test_gspo_matches_naive_loop():
    logp, old, adv, mask = _inputs(spread=0.01)
    out = LOSSES["gspo"](logp, old, adv, mask, eps_low=3e-3, eps_high=4e-3)
    for i in range(logp.shape[0]):
        n = int(mask[i].sum())
        s = math.exp(sum(float(logp[i, t] - old[i, t]) for t in range(n)) / n)
        a = float(adv[i])
        ref = -min(s * a, min(max(s, 1 - 3e-3), 1 + 4e-3) * a)
        torch.testing.assert_close(out.loss[i, 0].item(), ref, atol=1e-6, rtol=0)


def test_on_policy_clip_gradient_equals_reinforce():
    # μ = 1: old = sg(logp), ratio = 1, and ∇ of the clipped loss is -A·∇logp (REINFORCE)
    logp, _, adv, mask = _inputs()
    for name in ("clip", "gspo", "cispo"):
        x = logp.clone().requires_grad_()
        LOSSES[name](x, x.detach(), adv, mask).loss.mul(mask).sum().backward()
        y = logp.clone().requires_grad_()
        (-(adv[:, None] * y) * mask).sum().backward()
        # gspo: each of the |o_i| tokens carries -s·A with ∂s/∂logp_t = 1/|o_i|: the same total
        torch.testing.assert_close(x.grad, y.grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_padding_garbage_changes_nothing(name):
    from grpo_ar.core.aggregation import AGGREGATIONS

    logp, old, adv, mask = _inputs(seed=3)
    noisy_logp = torch.where(mask.bool(), logp, torch.full_like(logp, 1e4))
    noisy_old = torch.where(mask.bool(), old, torch.full_like(old, -1e4))
    grads = []
    for lp, od in ((logp, old), (noisy_logp, noisy_old)):
        x = lp.clone().requires_grad_()
        # clip_cov draws tokens at random: the same draw for both runs
        rng = {"generator": torch.Generator().manual_seed(0)} if name == "clip_cov" else {}
        loss = AGGREGATIONS["token_mean"](
            LOSSES[name](x, od, adv, mask, **rng).loss, mask, mask.sum(), 6, 8
        )
        loss.backward()
        grads.append((loss.detach(), x.grad * mask))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("adv_2d", [False, True])
def test_sweep_shapes_finite(name, dtype, adv_2d):
    logp, old, adv, mask = _inputs(dtype=torch.float64, spread=2.0)
    logp, old, adv, mask = (t.to(dtype) for t in (logp, old, adv, mask))
    if adv_2d:
        adv = adv[:, None].expand_as(logp).contiguous()
    out = LOSSES[name](logp, old, adv, mask)
    for t in out:
        assert t.expand_as(logp).shape == logp.shape and torch.isfinite(t).all()


def test_bad_options_raise():
    logp, old, adv, mask = _inputs()
    with pytest.raises(ValueError, match="eps_low"):
        LOSSES["clip"](logp, old, adv, mask, eps_low=1.5)
    with pytest.raises(ValueError, match="dual_clip"):
        LOSSES["clip"](logp, old, adv, mask, dual_clip=0.5)
    with pytest.raises(ValueError, match="min_weight"):
        LOSSES["cispo"](logp, old, adv, mask, max_weight=0.0)
