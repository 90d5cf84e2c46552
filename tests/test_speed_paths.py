"""Every speed path equals its plain reference: the cached, prefix-shared, row-compacting sampler
vs a naive loop re-running whole sequences; prompt-once scoring vs full sequences; the fused
chunked LM head vs logits; no (N, T, V) tensor kept for backward."""

import pytest
import torch

from grpo_ar.generation.decode_step import fast_step_for
from grpo_ar.generation.model_call import positions as _positions
from grpo_ar.generation.packing import best_bins, bins, packing_ok
from grpo_ar.generation.params import SamplingParams, allowed_mask, cfg_combine, transform_logits
from grpo_ar.generation.sampler import Draw as _Draw
from grpo_ar.generation.sampler import sample
from grpo_ar.generation.scoring import _packing_matches, head_split, token_logprobs
from grpo_ar.types import Entry, PromptBatch
from tiny import tiny_llama, tiny_qwen2


def _prompts(rows, uncond=None):
    def pad(rs):
        width = max(map(len, rs))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rs])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rs])
        return ids, mask

    ids, mask = pad(rows)
    pb = PromptBatch(ids, mask, [Entry(str(r), ()) for r in rows])
    if uncond is not None:
        pb.uncond_input_ids, pb.uncond_attention_mask = pad(uncond)
    return pb


PROMPTS = [[5, 6, 7], [3, 4, 5, 6, 7, 8, 9], [11]]
UNCOND = [[1], [1, 1], [1]]
PARAMS = {
    "eos_top_p": SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.8, eos_token_ids=(2,)),
    "min_new_top_k": SamplingParams(
        max_new_tokens=10,
        temperature=1.3,
        top_k=6,
        min_p=0.05,
        eos_token_ids=(2,),
        min_new_tokens=3,
    ),
    "ranges": SamplingParams(max_new_tokens=8, allowed_ranges=((10, 40),), eos_token_ids=(2,)),
    "cfg": SamplingParams(max_new_tokens=8, cfg_scale=3.0, top_p=0.9, eos_token_ids=(2,)),
    "fixed_length": SamplingParams(max_new_tokens=9, temperature=1.1),
}


@pytest.fixture(scope="module")
def model():
    m = tiny_llama(vocab_size=80)
    with torch.no_grad():  # make EOS likely, so rows finish early and leave the batch
        m.lm_head.weight[2] += 0.3 * m.lm_head.weight.mean(0)
        m.lm_head.weight[2] *= 1.5
    return m


@torch.no_grad()
def naive_sample(model, prompts, g, params, generator):
    """No cache, no prefix sharing, no compaction: the whole sequence re-run every step."""
    cfg = params.uses_cfg
    ids, mask = (
        prompts.input_ids.repeat_interleave(g, 0),
        prompts.attention_mask.repeat_interleave(g, 0),
    )
    if cfg:
        uids = prompts.uncond_input_ids.repeat_interleave(g, 0)
        umask = prompts.uncond_attention_mask.repeat_interleave(g, 0)
    n = ids.shape[0]
    draw, done = _Draw(n, generator, greedy=False), torch.zeros(n, dtype=torch.bool)
    allowed = allowed_mask(params, model.config.vocab_size, ids.device)
    toks = []
    for t in range(params.max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits[
            :, -1
        ]
        if cfg:
            u = model(input_ids=uids, attention_mask=umask, position_ids=_positions(umask)).logits
            logits = cfg_combine(logits, u[:, -1], params.cfg_scale)
        z = transform_logits(logits, params, allowed, True, t < params.min_new_tokens)
        tok, _ = draw(z, None)
        toks.append(torch.where(done, params.pad_token_id, tok))
        done |= torch.isin(tok, torch.tensor(params.eos_token_ids, dtype=torch.long))
        if done.all():
            break
        ids, mask = (
            torch.cat([ids, tok[:, None]], 1),
            torch.cat([mask, torch.ones_like(mask[:, :1])], 1),
        )
        if cfg:
            uids = torch.cat([uids, tok[:, None]], 1)
            umask = torch.cat([umask, torch.ones_like(umask[:, :1])], 1)
    return torch.stack(toks, 1)


@pytest.mark.parametrize("name", list(PARAMS))
def test_cached_sampler_equals_naive_uncached_loop(model, name):
    params = PARAMS[name]
    prompts = _prompts(PROMPTS, UNCOND if params.uses_cfg else None)
    fast = sample(model, prompts, 4, params, generator=torch.Generator().manual_seed(3))
    ref = naive_sample(model, prompts, 4, params, torch.Generator().manual_seed(3))
    assert torch.equal(fast.completion_ids, ref)
    if params.eos_token_ids and name != "cfg":
        ended = (~fast.truncated).sum()
        assert 0 < ended < len(fast), "the test needs rows that finish early and rows that run on"


@pytest.mark.parametrize("name", ["eos_top_p", "cfg"])
def test_sampler_paths_agree(model, name):
    """Prefix sharing, cache, and the fast Llama step (vs the HF forward) on/off: identical
    tokens and log-probs."""
    params = PARAMS[name]
    prompts = _prompts(PROMPTS, UNCOND if params.uses_cfg else None)
    flags = [(True, True, True), (True, True, False), (False, True, True), (False, False, False)]
    runs = [
        sample(
            model,
            prompts,
            3,
            params,
            torch.Generator().manual_seed(5),
            share_prefix=f[0],
            use_cache=f[1],
            fast=f[2],
        )
        for f in flags
    ]
    for r in runs[1:]:
        assert torch.equal(r.completion_ids, runs[0].completion_ids)
        torch.testing.assert_close(r.sampling_logp, runs[0].sampling_logp, atol=1e-5, rtol=0)


@pytest.fixture()
def exact_fp64(monkeypatch):
    """fp64 models, with HF's RMSNorm kept in fp64 (it computes in fp32 whatever the dtype, which
    would cap any fp64 comparison at fp32 precision)."""
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2

    def forward(self, x):
        return self.weight * (
            x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)
    monkeypatch.setattr(modeling_qwen2.Qwen2RMSNorm, "forward", forward)
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _grads(model, rollout, params, **kw):
    model.zero_grad(set_to_none=True)
    w = torch.randn(rollout.completion_ids.shape, generator=torch.Generator().manual_seed(0))
    logp, ent = token_logprobs(model, rollout, params, with_entropy=True, **kw)
    ((logp * w).sum() + ent.sum()).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), ent.detach(), grads


def _assert_same(a, b, atol, rel):
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=0)
    torch.testing.assert_close(a[1], b[1], atol=atol, rtol=0)
    assert a[2].keys() == b[2].keys()
    for k in a[2]:
        scale = b[2][k].abs().max().clamp(min=1e-6)
        assert float((a[2][k] - b[2][k]).abs().max() / scale) <= rel, k


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
@pytest.mark.parametrize("name", ["eos_top_p", "min_new_top_k", "cfg", "fixed_length"])
def test_scoring_fast_paths_equal_full_sequences(make, name, exact_fp64, monkeypatch):
    """Prompt scored once per group (completions padded or packed) + fused chunked head == full
    sequences through the logits, values and gradients (the plain path is the reference: no
    sharing, no fused head, no packing)."""
    import grpo_ar.generation.scoring

    packed = []
    real = grpo_ar.generation.scoring.packed_rest

    def spy(*a, **k):
        out = real(*a, **k)
        packed.append(out is not None)
        return out

    monkeypatch.setattr(grpo_ar.generation.scoring, "packed_rest", spy)
    model = make(vocab_size=80).double()
    params = PARAMS[name]
    prompts = _prompts(PROMPTS, UNCOND if params.uses_cfg else None)
    sampled = sample(model.eval(), prompts, 3, params, generator=torch.Generator().manual_seed(1))
    model.train()
    combos = [(True, True, True), (True, True, False), (True, False, True), (True, False, False)]
    for r in (sampled, _cut(sampled, [12, 2, 5, 1, 3, 9, 4, 4, 7])):
        ref = _grads(model, r, params, share_prefix=False, fused=False, pack=False)
        for share, fused, pack in combos + [(False, True, False)]:
            got = _grads(model, r, params, share_prefix=share, fused=fused, pack=pack)
            _assert_same(got, ref, atol=1e-10, rel=1e-10)
        packed.clear() if r is sampled else None
    assert packed and all(packed), "the cut rollout's packed runs must have packed"


def _cut(r, lengths):
    """The rollout with completion i cut to at most lengths[i] tokens (unequal lengths, so it
    packs)."""
    from dataclasses import replace

    steps = torch.arange(r.completion_ids.shape[1])
    upto = torch.minimum(torch.tensor(lengths), r.completion_mask.sum(1).long())
    keep = (steps[None] < upto[:, None]).float()
    return replace(
        r,
        completion_ids=r.completion_ids.masked_fill(keep == 0, 0),
        completion_mask=keep,
        sampling_logp=r.sampling_logp * keep,
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_scoring_equals_padded_default_path(attn):
    """fp32, the trainer's default call (packing where the model allows): sdpa takes a bool 4D
    mask, eager an additive float one; both pass the one-time check and equal padded rows."""
    model = tiny_llama(vocab_size=80)
    model.config._attn_implementation = attn
    params = PARAMS["eos_top_p"]
    r = sample(model, _prompts(PROMPTS), 4, params, generator=torch.Generator().manual_seed(4))
    r = _cut(r, [12, 2, 5, 1, 3, 9, 4, 4, 7, 12, 6, 2])
    model.train()
    _assert_same(_grads(model, r, params), _grads(model, r, params, pack=False), 2e-5, 2e-4)
    assert packing_ok(head_split(model)[0], lambda m: False)  # the real check ran and passed


class NoMask4D(torch.nn.Module):
    """A body that rejects 4D masks (as some attention kernels do): packing must switch off."""

    def __init__(self, body):
        super().__init__()
        self.body, self.config = body, body.config

    def forward(self, **kw):
        if kw["attention_mask"].ndim == 4:
            raise ValueError("no custom 4D masks here")
        return self.body(**kw)


def test_models_rejecting_4d_masks_score_padded():
    model = tiny_llama(vocab_size=80)
    body = NoMask4D(model.model)
    assert not packing_ok(body, lambda m: _packing_matches(m, True))
    assert packing_ok(model.model, lambda m: _packing_matches(m, True))


def test_bins_hold_one_prompt_within_the_longest():
    prompt_of = [0, 0, 0, 0, 1, 1, 1]
    need = [5, 1, 3, 0, 2, 2, 2]
    out = bins(prompt_of, need, width=0)
    assert sorted(i for b in out for i in b) == [0, 1, 2, 4, 5, 6]  # need 0: no tokens to run
    for b in out:
        assert len({prompt_of[i] for i in b}) == 1 and sum(need[i] for i in b) <= 5
    assert out == [[0], [2, 1], [4, 5], [6]]  # first fit, longest first, capacity 5
    assert bins(prompt_of, need, width=6) == [[0, 1], [2], [4, 5, 6]]  # capacity 6
    assert bins(prompt_of, need, width=11) == [[0, 2, 1], [4, 5, 6]]  # one bin per prompt
    # the cheapest capacity: 2 bins of width 9 (18 tokens) beat 4 of width 5 (20 tokens) unless
    # attention over the wider bins costs more than the 2 tokens save (a tiny hidden size)
    assert best_bins(prompt_of, need, prompt_width=4, hidden=1000) == [[0, 2, 1], [4, 5, 6]]
    assert best_bins(prompt_of, need, prompt_width=4, hidden=1) == [[0], [2, 1], [4, 5], [6]]


def test_scoring_fp32_matches_sampler_on_micro_batches(model):
    """fp32, default paths, a micro-batch holding one whole group and part of another."""
    params = PARAMS["eos_top_p"]
    r = sample(model, _prompts(PROMPTS), 4, params, generator=torch.Generator().manual_seed(2))
    for rows in ([0, 1, 2, 3], [2, 3, 4, 5, 6], list(range(12))):
        mb = r.select(rows)
        logp, _ = token_logprobs(model, mb, params)
        torch.testing.assert_close(logp, mb.sampling_logp, atol=1e-4, rtol=0)


def test_no_vocab_sized_tensor_saved_for_backward():
    model = tiny_llama(vocab_size=4096)  # V >> hidden, as in real models
    params = SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.8)
    r = sample(model, _prompts(PROMPTS), 4, params, generator=torch.Generator().manual_seed(2))
    n, t = r.completion_ids.shape
    params_ptr = {p.data_ptr() for p in model.parameters()}
    sizes = []

    def pack(x):
        if x.data_ptr() not in params_ptr:  # activations only, not the weights themselves
            sizes.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        token_logprobs(model.train(), r, params, with_entropy=True)
    assert head_split(model) is not None
    assert max(sizes) < n * t * 4096 / 8  # no (N, T, V) logits or log-softmax kept
    sizes.clear()  # the check sees them on the logits path
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        token_logprobs(model, r, params, with_entropy=True, fused=False)
    assert max(sizes) >= n * t * 4096 / 2


class ScaledLogits(torch.nn.Module):
    """A causal LM whose logits are not `lm_head(hidden)`: the fused path must refuse it."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config
        self.model, self.lm_head = inner.model, inner.lm_head

    def forward(self, **kw):
        out = self.inner(**kw)
        out.logits = out.logits * 0.5
        return out


def test_models_without_plain_head_take_the_logits_path(model):
    wrapped = ScaledLogits(model)
    assert head_split(wrapped) is None
    assert fast_step_for(wrapped, 8) is None and fast_step_for(model, 8) is not None
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    r = sample(wrapped, _prompts(PROMPTS), 2, params, generator=torch.Generator().manual_seed(0))
    logp, _ = token_logprobs(wrapped, r, params)
    torch.testing.assert_close(logp, r.sampling_logp, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="lm_head"):
        token_logprobs(wrapped, r, params, fused=True)
