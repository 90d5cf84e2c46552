"""Token-budget micro-batches with their padding trimmed give the untrimmed full batch's loss
and gradient exactly (aggregations take the global token count)."""

import pytest
import torch

from grpo_ar.core import AGGREGATIONS, LOSSES
from grpo_ar.generation.params import SamplingParams
from grpo_ar.generation.sampler import sample
from grpo_ar.generation.scoring import token_logprobs
from grpo_ar.types import Entry, PromptBatch
from tiny import tiny_llama

PARAMS = SamplingParams(max_new_tokens=14, temperature=1.0, eos_token_ids=(2,))


@pytest.fixture()
def setup(monkeypatch):
    from transformers.models.llama import modeling_llama

    def rms_fp64(self, x):  # HF's RMSNorm computes in fp32 whatever the dtype: keep fp64
        return self.weight * (
            x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_fp64)
    model = tiny_llama(vocab_size=80).double()
    with torch.no_grad():  # EOS likely: completions of many lengths
        model.lm_head.weight[2] += 0.4 * model.lm_head.weight.mean(0)
        model.lm_head.weight[2] *= 1.5
    rows = [[5, 6, 7], [3, 4, 5, 6, 7, 8, 9, 10, 11], [12], [8, 8, 9, 9]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    prompts = PromptBatch(ids, mask, [Entry(str(r), ()) for r in rows])
    r = sample(model, prompts, 4, PARAMS, generator=torch.Generator().manual_seed(0))
    # 3 more all-padding columns: the untrimmed batch is wider than any sample needs
    r.completion_ids = torch.nn.functional.pad(r.completion_ids, (0, 3), value=0)
    r.completion_mask = torch.nn.functional.pad(r.completion_mask, (0, 3))
    r.sampling_logp = torch.nn.functional.pad(r.sampling_logp, (0, 3))
    g = torch.Generator().manual_seed(1)
    r.data["adv"] = torch.randn(len(r), generator=g, dtype=torch.float64)
    noise = 0.05 * torch.randn(r.sampling_logp.shape, generator=g, dtype=torch.float64)
    r.data["old_logp"] = r.sampling_logp.double() + noise
    return model, r


def _loss_and_grads(model, micro, totals, agg):
    model.zero_grad(set_to_none=True)
    total = 0.0
    for mb in micro:
        logp, _ = token_logprobs(model, mb, PARAMS)
        mask = mb.completion_mask.double()
        terms = LOSSES["clip"](logp, mb.data["old_logp"], mb.data["adv"], mask, eps_high=0.28)
        loss = AGGREGATIONS[agg](terms.loss, mask, *totals)
        loss.backward()
        total += float(loss.detach())
    return total, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("budget", [1, 40, 90, 10_000])
def test_token_budget_micro_batches_equal_untrimmed_batch(setup, agg, budget):
    model, r = setup
    assert 1 < int(r.lengths.min()) < int(r.lengths.max()) < r.completion_ids.shape[1]
    totals = (float(r.completion_mask.sum()), len(r), PARAMS.max_new_tokens)
    micro = r.micro_batches(1, token_budget=budget)
    rows = sorted(i for mb in micro for i in _origin(r, mb))
    assert rows == list(range(len(r)))  # every sample exactly once
    for mb in micro:  # padding trimmed, budget kept (a single row may exceed a tiny budget)
        width = mb.prompts.input_ids.shape[1] + mb.completion_ids.shape[1]
        assert mb.completion_ids.shape[1] == int(mb.lengths.max())
        assert len(mb) * width <= budget or len(mb) == 1 or budget < width
    if budget >= 10_000:
        assert len(micro) == 1
    full_loss, full_grads = _loss_and_grads(model, [r], totals, agg)  # untrimmed, one batch
    loss, grads = _loss_and_grads(model, micro, totals, agg)
    assert abs(loss - full_loss) <= 1e-12
    for k in full_grads:
        torch.testing.assert_close(grads[k], full_grads[k], atol=1e-12, rtol=0)


def _origin(r, mb):
    """Rows of `r` that micro-batch `mb` holds (matched by their advantages, all distinct)."""
    return [int((r.data["adv"] == a).nonzero()) for a in mb.data["adv"]]


def test_token_budget_keeps_groups_whole_when_they_fit(setup):
    _, r = setup
    for mb in r.micro_batches(1, token_budget=200):
        counts = torch.bincount(mb.group_ids)
        assert set(counts[counts > 0].tolist()) == {r.group_size}


def test_bad_budget_rejected(setup):
    with pytest.raises(ValueError, match="token_budget"):
        setup[1].micro_batches(1, token_budget=0)
