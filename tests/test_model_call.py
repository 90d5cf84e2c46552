"""The model-call seam: the causal LM's one HF call equals its embed -> run -> logits parts, and
the sampler and scorer run any ModelCall through those parts alone (no fast decode step, no
fused head) to the same rollouts and log-probs."""

from __future__ import annotations

import pytest
import torch

from grpo_ar.adapters.text import TextAdapter
from grpo_ar.generation.decode_step import new_cache
from grpo_ar.generation.model_call import (
    MODEL_CALLS,
    CausalLMCall,
    ModelCall,
    as_call,
    positions,
)
from grpo_ar.generation.params import SamplingParams
from grpo_ar.generation.sampler import sample
from grpo_ar.generation.scoring import token_logprobs
from grpo_ar.testing import char_tokenizer, tiny_llama
from grpo_ar.types import PromptBatch


class PartsOnly(CausalLMCall):
    """The causal LM through `ModelCall.forward` (embed, run, logits) with no optional
    capability: what a new model's call gets before it adds a fused head or a fast step."""

    forward = ModelCall.forward

    def head_split(self):
        return None

    def fast_parts(self):
        return None


def _prompts():
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    pb = PromptBatch(ids, mask, [None, None])
    pb.uncond_input_ids, pb.uncond_attention_mask = torch.full_like(ids, 4), mask.clone()
    return pb


def test_the_one_hf_call_equals_embed_run_logits():
    model = tiny_llama()
    call, parts = as_call(model), PartsOnly(model)
    assert isinstance(call, CausalLMCall) and as_call(call) is call
    pb = _prompts()
    ids, mask = pb.input_ids, pb.attention_mask
    outs = []
    for c in (call, parts):
        cache = new_cache(c, 8)
        first = c.forward(ids, mask, positions(mask), cache, 1)  # (2, 1, V)
        full = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        step = c.forward(torch.tensor([[3], [4]]), full, mask.sum(1, keepdim=True), cache, 1, True)
        outs.append(torch.cat([first, step], 1))
    assert outs[0].shape == (2, 2, 80)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_sampler_and_scorer_run_a_call_through_its_parts(cfg_scale):
    model = tiny_llama()
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, cfg_scale=cfg_scale)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    want = sample(model, _prompts(), 3, params, generator=gen())
    got = sample(PartsOnly(model), _prompts(), 3, params, generator=gen())
    assert torch.equal(got.completion_ids, want.completion_ids)
    # the default takes FastStep for decode steps, the parts HF's forward: fp32 rounding apart
    torch.testing.assert_close(got.sampling_logp, want.sampling_logp, atol=1e-5, rtol=0)
    for share in (True, False):
        lp, _ = token_logprobs(PartsOnly(model), want, params, share_prefix=share)
        torch.testing.assert_close(lp, want.sampling_logp, atol=1e-5, rtol=0)


def test_adapters_choose_their_call_by_name():
    import grpo_ar.adapters.janus  # noqa: F401  # registers "janus_image"

    assert {"causal_lm", "janus_image"} <= set(MODEL_CALLS)
    model = tiny_llama()
    ad = TextAdapter(char_tokenizer(), SamplingParams(max_new_tokens=4))
    assert ad.call_name == "causal_lm" and type(ad.model_call(model)) is CausalLMCall
    own = PartsOnly(model)
    assert ad.model_call(own) is own  # a ModelCall is used as it is
    with pytest.raises(KeyError, match="unknown model call 'nope'; valid names: .*causal_lm"):
        MODEL_CALLS["nope"]
