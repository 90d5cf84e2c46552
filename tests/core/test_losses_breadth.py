"""The policy losses beyond PPO/GSPO/CISPO: hand-computed cases, naive loops, the gradients the
papers state, and the reduction identities (δ = ∞ is clip, LUSPO = GSPO × length, ...)."""

import math

import pytest
import torch

from grpo_ar.core.aggregation import AGGREGATIONS
from grpo_ar.core.losses import LOSSES

F64 = torch.float64


def _inputs(seed=0, n=6, t=8, spread=0.3, equal_lengths=False):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=g, dtype=F64) * 3
    old = logp + torch.randn(n, t, generator=g, dtype=F64) * spread
    adv = torch.randn(n, generator=g, dtype=F64)
    mask = torch.ones(n, t, dtype=F64)
    if not equal_lengths:
        for i in range(n):
            mask[i, int(torch.randint(1, t + 1, (1,), generator=g)) :] = 0
    return logp, old, adv, mask


def close(a, b, atol=1e-6):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# -- two-sided clip (INTELLECT-2) ---------------------------------------------------------------
def test_delta_hand_computed():
    # r = 5: A = +1 is clipped at 1.2 either way; A = -1: plain clip gives 5, δ = 4 caps it at 4
    logp = torch.log(torch.tensor([[5.0, 5.0, 0.5]], dtype=F64))
    adv = torch.tensor([[1.0, -1.0, -1.0]], dtype=F64)
    out = LOSSES["clip"](logp, torch.zeros_like(logp), adv, torch.ones(1, 3), delta=4.0)
    close(out.loss, torch.tensor([[-1.2, 4.0, 0.8]], dtype=F64))


def test_delta_infinite_is_plain_clip_and_small_delta_refused():
    logp, old, adv, mask = _inputs(spread=1.5)
    plain = LOSSES["clip"](logp, old, adv, mask, eps_high=0.28)
    inf = LOSSES["clip"](logp, old, adv, mask, eps_high=0.28, delta=math.inf)
    assert torch.equal(plain.loss, inf.loss)
    with pytest.raises(ValueError, match="delta=1.1 must exceed 1 \\+ eps_high"):
        LOSSES["clip"](logp, old, adv, mask, delta=1.1)


# -- ratio level --------------------------------------------------------------------------------
def test_sequence_ratio_level_clip_is_gspo():
    logp, old, adv, mask = _inputs(spread=0.01)
    a = LOSSES["clip"](logp, old, adv, mask, eps_low=3e-4, eps_high=4e-4, ratio_level="sequence")
    b = LOSSES["gspo"](logp, old, adv, mask)
    assert torch.equal(a.loss, b.loss)
    with pytest.raises(ValueError, match="ratio_level='word'"):
        LOSSES["clip"](logp, old, adv, mask, ratio_level="word")


# -- GSPO-token -----------------------------------------------------------------------------------
def test_gspo_token_value_is_gspo_gradient_is_per_token():
    logp, old, adv, mask = _inputs(spread=0.0001)
    x = logp.clone().requires_grad_()
    out = LOSSES["gspo_token"](x, old, adv, mask)
    close(out.loss * mask, LOSSES["gspo"](logp, old, adv, mask).loss * mask, atol=1e-12)
    (out.loss * mask).sum().backward()
    # ∂/∂logp_t of -s_t·A with s_t = sg[s]·π_t/sg[π_t]: -sg[s]·A for every unclipped token
    lr = ((logp - old) * mask).sum(-1) / mask.sum(-1)
    inside = (
        ((lr.exp() > 1 - 3e-4) & (lr.exp() < 1 + 4e-4))
        | ((lr.exp() >= 1 + 4e-4) & (adv < 0))
        | ((lr.exp() <= 1 - 3e-4) & (adv > 0))
    )
    expected = torch.where(inside[:, None], -lr.exp()[:, None] * adv[:, None], 0.0) * mask
    close(x.grad, expected, atol=1e-12)


def test_gspo_token_takes_token_advantages():
    logp, old, _, mask = _inputs(spread=0.0)
    adv = torch.arange(48, dtype=F64).view(6, 8) / 10
    x = logp.clone().requires_grad_()
    LOSSES["gspo_token"](x, old, adv, mask).loss.mul(mask).sum().backward()
    close(x.grad, -adv * mask)  # on-policy: s = 1, gradient -A_t per token


# -- SAPO -----------------------------------------------------------------------------------------
def test_sapo_hand_computed():
    logp = torch.log(torch.tensor([[1.5, 1.5]], dtype=F64))
    adv = torch.tensor([[1.0, -1.0]], dtype=F64)
    out = LOSSES["sapo"](logp, torch.zeros_like(logp), adv, torch.ones(1, 2))
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expected = [[-4 * sig(0.5), 4 / 1.05 * sig(1.05 * 0.5)]]
    close(out.loss, torch.tensor(expected, dtype=F64))


def test_sapo_gate_gradient():
    # SAPO eq. (gate): ∂ loss/∂ logp = -4·σ(τ(r-1))·(1-σ(τ(r-1)))·r·A, τ by the sign of A
    logp, old, adv, mask = _inputs(spread=0.8)
    x = logp.clone().requires_grad_()
    LOSSES["sapo"](x, old, adv, mask, tau_pos=0.7, tau_neg=1.3).loss.sum().backward()
    r = (logp - old).exp()
    a = adv[:, None].expand_as(r)
    tau = torch.where(a > 0, 0.7, 1.3)
    s = torch.sigmoid(tau * (r - 1))
    close(x.grad, -4 * s * (1 - s) * r * a, atol=1e-12)


# -- LUSPO ----------------------------------------------------------------------------------------
def test_luspo_equal_lengths_is_gspo_times_length_and_refuses_token_ratios():
    logp, old, adv, mask = _inputs(spread=0.01, equal_lengths=True)
    a = LOSSES["luspo"](logp, old, adv, mask).loss
    b = LOSSES["gspo"](logp, old, adv, mask).loss
    close(a, b * 8, atol=1e-12)
    logp, old, adv, mask = _inputs(spread=0.01)  # unequal: each sequence scaled by its own length
    a = LOSSES["luspo"](logp, old, adv, mask).loss
    b = LOSSES["gspo"](logp, old, adv, mask).loss
    close(a, b * mask.sum(-1, keepdim=True), atol=1e-12)
    with pytest.raises(ValueError, match="needs ratio_level='sequence'"):
        LOSSES["luspo"](logp, old, adv, mask, ratio_level="token")


# -- VESPO ----------------------------------------------------------------------------------------
def test_vespo_hand_computed_and_weight_detached():
    logp = torch.tensor([[-1.0, -2.0, 7.0]], dtype=F64)  # third token is padding
    old = torch.tensor([[-1.1, -1.7, 0.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=F64)
    adv = torch.tensor([1.5], dtype=F64)
    x = logp.clone().requires_grad_()
    out = LOSSES["vespo"](x, old, adv, mask)
    log_w = 0.1 + (-0.3)
    phi = math.exp(3.0 + 2.0 * log_w - 3.0 * math.exp(log_w))  # k+ = 2, λ+ = 3
    close(out.loss[0, :2], torch.tensor([1.5 * phi, 2 * 1.5 * phi], dtype=F64))
    (out.loss * mask).sum().backward()
    close(x.grad, torch.tensor([[-1.5 * phi, -1.5 * phi, 0.0]], dtype=F64))


def test_vespo_on_policy_is_reinforce_and_is_weight_folds_into_w():
    logp, _, adv, mask = _inputs()
    x = logp.clone().requires_grad_()
    LOSSES["vespo"](x, logp, adv, mask).loss.mul(mask).sum().backward()
    close(x.grad, -adv[:, None] * mask)  # φ(1) = 1
    # a sampler weight w_is multiplies w, not the loss: φ(w·w_is)
    w_is = torch.full_like(logp, 1.1)
    got = LOSSES["vespo"](logp, logp, adv, mask, is_weight=w_is).loss
    n = mask.sum(-1, keepdim=True)
    log_w = n * math.log(1.1)
    k = torch.where(adv[:, None] >= 0, 2.0, 3.0)
    lam = torch.where(adv[:, None] >= 0, 3.0, 2.0)
    phi = torch.exp(lam + k * log_w - lam * log_w.exp())
    close(got * mask, -phi * adv[:, None] * logp * mask, atol=1e-12)


# -- Clip-Cov / KL-Cov (verl) ---------------------------------------------------------------------
def _naive_cov(adv, logp, mask):
    vals = [(i, t) for i in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[i, t]]
    a_mean = sum(float(adv[i]) for i, _ in vals) / len(vals)
    l_mean = sum(float(logp[i, t]) for i, t in vals) / len(vals)
    return {(i, t): (float(adv[i]) - a_mean) * (float(logp[i, t]) - l_mean) for i, t in vals}


def test_kl_cov_matches_naive_loop():
    logp, old, adv, mask = _inputs(seed=4, spread=0.4)
    adv = adv * 4
    out = LOSSES["kl_cov"](logp, old, adv, mask, cov_ratio=0.1, kl_coef=0.5)
    cov = _naive_cov(adv, logp, mask)
    k = max(int(len(cov) * 0.1), 1)
    top = set(sorted(cov, key=cov.get, reverse=True)[:k])
    for (i, t), _ in cov.items():
        lr = float(logp[i, t] - old[i, t])
        ref = -math.exp(lr) * float(adv[i]) + (0.5 * abs(lr) if (i, t) in top else 0.0)
        assert abs(float(out.loss[i, t]) - ref) < 1e-9


def test_clip_cov_drops_only_in_band_unclipped_tokens():
    logp, old, adv, mask = _inputs(seed=5, spread=0.5)
    adv = adv * 6  # spread covariances into the (1, 5) band
    g = torch.Generator().manual_seed(1)
    x = logp.clone().requires_grad_()
    out = LOSSES["clip_cov"](x, old, adv, mask, cov_ratio=0.1, generator=g)
    plain = LOSSES["clip"](logp, old, adv, mask)
    (out.loss * mask).sum().backward()
    cov = _naive_cov(adv, logp, mask)
    r = (logp - old).exp()
    a = adv[:, None].expand_as(r)
    clipped = (-torch.clamp(r, 0.8, 1.2) * a) > (-r * a)
    band = {k for k, c in cov.items() if 1.0 < c < 5.0 and not clipped[k]}
    dropped = {k for k in cov if out.loss[k] == 0 and plain.loss[k] != 0}
    assert len(band) >= 2
    assert dropped <= band and len(dropped) == min(max(int(0.1 * len(cov)), 1), len(band))
    for k in dropped:
        assert x.grad[k] == 0
    kept = [k for k in cov if k not in dropped]
    for k in kept:
        assert out.loss[k] == plain.loss[k]


@pytest.mark.parametrize("name", ["sapo", "gspo_token", "vespo", "kl_cov"])
def test_on_policy_gradient_equals_reinforce(name):
    logp, _, adv, mask = _inputs()
    x = logp.clone().requires_grad_()
    LOSSES[name](x, x.detach(), adv, mask).loss.mul(mask).sum().backward()
    close(x.grad, -adv[:, None] * mask)


@pytest.mark.parametrize("name", sorted(set(LOSSES) - {"vespo"}))  # VESPO: weight folds into w
def test_is_weight_scales_the_loss_and_stays_detached(name):
    logp, old, adv, mask = _inputs(seed=2)
    w = torch.rand(logp.shape, dtype=F64, generator=torch.Generator().manual_seed(3)) + 0.5
    w.requires_grad_()
    kw = {"generator": torch.Generator().manual_seed(0)} if name == "clip_cov" else {}
    base = LOSSES[name](logp, old, adv, mask, **kw).loss
    kw = {"generator": torch.Generator().manual_seed(0)} if name == "clip_cov" else {}
    out = LOSSES[name](logp, old, adv, mask, is_weight=w, **kw).loss
    close(out, base * w.detach(), atol=1e-12)
    assert not out.requires_grad


def test_token_mean_of_luspo_differs_from_seq_mean_token_sum_only_by_kl_handling():
    # TRL's luspo = Σ_t loss / B; grpo_ar's luspo with seq_mean_token_mean gives the same policy term
    logp, old, adv, mask = _inputs(spread=0.01)
    a = AGGREGATIONS["seq_mean_token_mean"](
        LOSSES["luspo"](logp, old, adv, mask).loss, mask, 0, 6, 8
    )
    b = AGGREGATIONS["seq_mean_token_sum"](
        LOSSES["clip"](logp, old, adv, mask, eps_low=3e-4, eps_high=4e-4, ratio_level="sequence").loss,
        mask, 0, 6, 8,
    )  # fmt: skip
    close(a, b, atol=1e-12)
