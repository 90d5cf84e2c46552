import pytest
import torch

from grpo_ar.core.logprobs import (
    entropy_from_logits,
    fused_head_logprobs,
    logprobs_and_entropy,
    selective_log_softmax,
)


def naive(logits, ids, temperature=1.0):
    lp = torch.log_softmax(
        logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, -1
    )
    return lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1), -(lp.exp() * lp).sum(-1)


def test_hand_computed():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]]])
    ids = torch.tensor([[1, 0]])
    z = 3 + torch.e**2
    expected = torch.tensor([[-torch.log(torch.tensor(4.0)), 2 - torch.log(torch.tensor(z))]])
    torch.testing.assert_close(selective_log_softmax(logits, ids), expected, atol=1e-6, rtol=0)
    h0 = torch.log(torch.tensor(4.0))
    p = torch.tensor([torch.e**2, 1, 1, 1]) / z
    h1 = -(p * p.log()).sum()
    torch.testing.assert_close(
        entropy_from_logits(logits)[0], torch.stack([h0, h1]), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("chunk_elems", [1, 50, 1 << 24])
def test_equals_naive_fp32(temperature, chunk_elems):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 33, generator=g) * 4
    ids = torch.randint(0, 33, (3, 7), generator=g)
    lp, ent = logprobs_and_entropy(logits, ids, temperature, chunk_elems=chunk_elems)
    ref_lp, ref_ent = naive(logits, ids, temperature)
    torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 1e-5), (torch.float64, 1e-6)])
def test_dtypes_upcast(dtype, atol):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 5, 1000, generator=g) * 3).to(dtype)
    ids = torch.randint(0, 1000, (2, 5), generator=g)
    lp = selective_log_softmax(logits, ids, chunk_elems=3000)
    assert lp.dtype == torch.promote_types(dtype, torch.float32)
    # exact with respect to the bf16 values themselves, computed in fp64
    ref, _ = naive(logits.double(), ids)
    torch.testing.assert_close(lp.double(), ref, atol=atol, rtol=0)


def test_gradients_match_naive_with_checkpointed_chunks():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(4, 6, 50, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 50, (4, 6), generator=g)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    a = base.clone().requires_grad_()
    lp, ent = logprobs_and_entropy(a, ids, 0.9, chunk_elems=120)  # 2 rows per chunk
    ((lp * w).sum() + ent.sum()).backward()
    b = base.clone().requires_grad_()
    rlp, rent = naive(b, ids, 0.9)
    ((rlp.double() * w).sum() + rent.double().sum()).backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=0)


def test_filtered_tokens_give_finite_entropy():
    logits = torch.tensor([[[1.0, float("-inf"), 0.5, float("-inf")]]])
    ids = torch.tensor([[2]])
    lp, ent = logprobs_and_entropy(logits, ids)
    ref_lp, ref_ent = naive(logits[..., [0, 2]], torch.tensor([[1]]))
    torch.testing.assert_close(lp, ref_lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=1e-6, rtol=0)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="disagree"):
        selective_log_softmax(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def _top_k_mask(k):
    def fn(z, start):
        return z.masked_fill(z < torch.topk(z, k, -1).values[:, -1:], float("-inf"))

    return fn


def naive_head(hidden, weight, bias, ids, temperature, mask_fn=None):
    z = (hidden @ weight.t() + (0 if bias is None else bias)) / temperature
    if mask_fn is not None:
        z = mask_fn(z.reshape(-1, z.shape[-1]), 0).reshape(z.shape)
    lp = torch.log_softmax(z, -1)
    ent = -(lp.exp() * lp.masked_fill(~torch.isfinite(lp), 0.0)).sum(-1)
    return lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1), ent


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunk_elems", [1, 3 * 40, 1 << 22])  # 1 row, 3 rows, everything
@pytest.mark.parametrize("masked,bias,loss", [(False, False, "both"), (True, True, "both"),
                                              (False, True, "logp"), (True, False, "entropy")])  # fmt: skip
def test_fused_head_equals_naive_values_and_gradients(temperature, chunk_elems, masked, bias, loss):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(3, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(40, 8, generator=g, dtype=torch.float64) * 2).requires_grad_()
    b = torch.randn(40, generator=g, dtype=torch.float64).requires_grad_() if bias else None
    mask_fn = _top_k_mask(7) if masked else None
    with torch.no_grad():  # sampled tokens are never masked: take the 3rd most likely
        ids = (h @ w.t() + (0 if b is None else b)).topk(3, -1).indices[..., 2]
    c1, c2 = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    c1, c2 = (c1, c2 * 0) if loss == "logp" else (c1 * 0, c2) if loss == "entropy" else (c1, c2)
    leaves = [x for x in (h, w, b) if x is not None]
    lp, ent = fused_head_logprobs(h, w, ids, b, temperature, True, mask_fn, chunk_elems)
    got = torch.autograd.grad((lp * c1 + ent * c2).sum(), leaves)
    rlp, rent = naive_head(h, w, b, ids, temperature, mask_fn)
    want = torch.autograd.grad((rlp * c1 + rent * c2).sum(), leaves)
    torch.testing.assert_close(lp, rlp, atol=1e-10, rtol=0)
    torch.testing.assert_close(ent, rent, atol=1e-10, rtol=0)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, atol=1e-10, rtol=0)


def test_fused_head_fp32_large_vocab_close_to_fp64():
    g = torch.Generator().manual_seed(4)
    h, w = torch.randn(64, 96, generator=g), torch.randn(20_000, 96, generator=g) * 0.1
    ids = torch.randint(0, 20_000, (64,), generator=g)
    lp, ent = fused_head_logprobs(h, w, ids, chunk_elems=20_000 * 16)
    rlp, rent = naive_head(h.double(), w.double(), None, ids, 1.0)
    torch.testing.assert_close(lp.double(), rlp, atol=5e-6, rtol=0)
    torch.testing.assert_close(ent.double(), rent, atol=5e-6, rtol=0)


def test_fused_head_bf16_upcasts():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(4, 6, 16, generator=g).bfloat16().requires_grad_()
    w = torch.randn(300, 16, generator=g).bfloat16().requires_grad_()
    ids = torch.randint(0, 300, (4, 6), generator=g)
    lp, ent = fused_head_logprobs(h, w, ids, chunk_elems=600)
    assert lp.dtype == ent.dtype == torch.float32
    (lp.sum() + ent.sum()).backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16
    rlp, rent = naive_head(h.detach().float(), w.detach().float(), None, ids, 1.0)
    torch.testing.assert_close(lp, rlp, atol=0.1, rtol=0)  # bf16 logits: ~3 significant digits
    torch.testing.assert_close(ent, rent, atol=0.1, rtol=0)


def test_fused_head_no_entropy_and_bad_shapes():
    h, w = torch.randn(2, 3, 4), torch.randn(10, 4)
    lp, ent = fused_head_logprobs(h, w, torch.zeros(2, 3, dtype=torch.long), with_entropy=False)
    assert ent is None and lp.shape == (2, 3)
    with pytest.raises(ValueError, match="disagree"):
        fused_head_logprobs(h, w, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden size"):
        fused_head_logprobs(h, torch.randn(10, 5), torch.zeros(2, 3, dtype=torch.long))
