import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo_ar.core.aggregation import AGGREGATIONS
from grpo_ar.core.kl import KL
from grpo_ar.core.losses import LOSSES


def test_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    agg = {k: AGGREGATIONS[k](loss, mask, 4, 2, 5) for k in AGGREGATIONS}
    torch.testing.assert_close(
        agg["seq_mean_token_mean"], torch.tensor((2.0 + 4.0) / 2), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(agg["token_mean"], torch.tensor(10.0 / 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        agg["seq_mean_token_sum_norm"], torch.tensor(10.0 / (2 * 5)), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(agg["seq_mean_token_sum"], torch.tensor(10.0 / 2), atol=1e-6, rtol=0)


def naive(name, loss, mask, max_len):
    rows = [[float(v) for v, m in zip(lr, mr) if m] for lr, mr in zip(loss, mask)]
    if name == "seq_mean_token_mean":
        return sum(sum(r) / max(len(r), 1) for r in rows) / len(rows)
    if name == "token_mean":
        return sum(map(sum, rows)) / max(sum(map(len, rows)), 1)
    if name == "seq_mean_token_sum":
        return sum(map(sum, rows)) / len(rows)
    return sum(map(sum, rows)) / (len(rows) * max_len)


@pytest.mark.parametrize("name", sorted(AGGREGATIONS))
def test_matches_naive_loop_and_ignores_padding(name):
    g = torch.Generator().manual_seed(0)
    loss = torch.randn(5, 7, generator=g, dtype=torch.float64)
    mask = (torch.arange(7) < torch.tensor([[1], [7], [3], [4], [2]])).double()
    garbage = torch.where(mask.bool(), loss, torch.full_like(loss, float("nan")))
    out = AGGREGATIONS[name](garbage, mask, mask.sum(), 5, 9)
    assert abs(float(out) - naive(name, loss, mask, 9)) <= 1e-6


def _batch(seed, n, t):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=g, dtype=torch.float64) * 2
    old = logp.detach() + torch.randn(n, t, generator=g, dtype=torch.float64) * 0.2
    ref = logp.detach() + torch.randn(n, t, generator=g, dtype=torch.float64) * 0.2
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (n, 1), generator=g)
    mask = (torch.arange(t) < lengths).double()
    return logp, old, ref, adv, mask


def _loss(agg, loss_name, logp, old, ref, adv, mask, totals):
    tok = LOSSES[loss_name](logp, old, adv, mask).loss + 0.04 * KL["k3"](logp, ref)
    return AGGREGATIONS[agg](tok, mask, *totals)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_micro=st.integers(1, 4),
    per_micro=st.integers(1, 4),
    t=st.integers(1, 9),
    agg=st.sampled_from(sorted(AGGREGATIONS)),
    # clip_cov / kl_cov select tokens by statistics of the tokens they are given (verl: the
    # micro-batch), so they are split-dependent by definition; tested in test_losses_breadth.py
    loss_name=st.sampled_from(sorted(set(LOSSES) - {"clip_cov", "kl_cov"})),
    shards=st.integers(1, 2),
)
def test_micro_batch_and_shard_invariance(seed, n_micro, per_micro, t, agg, loss_name, shards):
    """Any split (micro-batches × data-parallel shards) with the global counts sums to the full
    batch's loss and gradient."""
    n = n_micro * per_micro * shards
    logp, old, ref, adv, mask = _batch(seed, n, t)
    totals = (mask.sum(), n, t)
    full_x = logp.clone().requires_grad_()
    full = _loss(agg, loss_name, full_x, old, ref, adv, mask, totals)
    full.backward()
    split_x = logp.clone().requires_grad_()
    total = torch.zeros((), dtype=torch.float64)
    for rows in torch.arange(n).chunk(n_micro * shards):
        part = _loss(
            agg, loss_name, split_x[rows], old[rows], ref[rows], adv[rows], mask[rows], totals
        )
        part.backward()  # gradients accumulate, as under grad accumulation / DDP all-reduce(sum)
        total = total + part.detach()
    torch.testing.assert_close(total, full.detach(), atol=1e-9, rtol=0)
    torch.testing.assert_close(split_x.grad, full_x.grad, atol=1e-9, rtol=0)
