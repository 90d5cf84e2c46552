import pytest
import torch

from grpo_ar.core.logprobs import entropy_from_logits, logprobs_and_entropy, selective_log_softmax


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
