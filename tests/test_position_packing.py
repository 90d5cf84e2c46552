"""Position-id packing (`packing.position_packed`): every sample's full sequence in one row,
position ids restarting at 0, no attention mask, the layout flash-attention's varlen kernels
take. Here it runs for real under sdpa and eager, where transformers 5.24 builds the
block-causal mask from the restarting positions itself (masking_utils
`find_packed_sequence_indices`); log-probs and gradients equal padded scoring in fp32."""

import pytest
import torch
from test_speed_paths import PARAMS, PROMPTS, UNCOND, _cut, _grads, _prompts

import grpo_ar.generation.scoring as scoring
from grpo_ar.config import load_config
from grpo_ar.errors import ConfigError
from grpo_ar.generation.model_call import CausalLMCall, ModelCall
from grpo_ar.generation.packing import packing_mode, position_packed, set_packing
from grpo_ar.generation.sampler import sample
from grpo_ar.generation.scoring import completion_outputs, token_logprobs
from tiny import tiny_llama, tiny_qwen2


def _rollout(model, params, g=4, seed=4):
    prompts = _prompts(PROMPTS, UNCOND if params.uses_cfg else None)
    r = sample(model.eval(), prompts, g, params, generator=torch.Generator().manual_seed(seed))
    model.train()
    return _cut(r, [12, 2, 5, 1, 3, 9, 4, 4, 7, 12, 6, 2][: len(r)])


def _check(got, want, tol=1e-5):
    """Log-probs and entropies within `tol` (fp32, absolute); every gradient within `tol` of
    its largest entry (the padded and the shared-prefix paths themselves differ by ~3e-7 of
    it: fp32 sums in another order)."""
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, atol=tol, rtol=0)
    assert got[2].keys() == want[2].keys() and got[2]
    for k in want[2]:
        scale = float(want[2][k].abs().max())
        torch.testing.assert_close(got[2][k], want[2][k], atol=tol * scale, rtol=0, msg=k)


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("fused", [True, False])
def test_position_packing_equals_padded_scoring(make, attn, fused):
    model = make(vocab_size=80)
    model.config._attn_implementation = attn
    params = PARAMS["eos_top_p"]
    r = _rollout(model, params)
    padded = _grads(model, r, params, share_prefix=False, fused=fused, pack=False)
    shared = _grads(model, r, params, share_prefix=True, fused=fused, pack=False)
    packed = _grads(model, r, params, fused=fused, pack="position_ids")
    _check(packed, padded)
    _check(packed, shared)


@pytest.mark.parametrize("name", ["cfg", "min_new_top_k"])
def test_position_packing_under_cfg_and_masked_transforms(name):
    model = tiny_llama(vocab_size=80)
    params = PARAMS[name]
    r = _rollout(model, params, g=3, seed=1)
    want = _grads(model, r, params, share_prefix=False, pack=False)
    _check(_grads(model, r, params, pack="position_ids"), want)


def test_the_restarting_positions_are_what_separates_the_samples():
    """Power: the same row with positions that do not restart (one long causal sequence)
    lets samples attend to each other and differs from padded scoring."""
    model = tiny_llama(vocab_size=80).eval()
    params = PARAMS["eos_top_p"]
    r = _rollout(model, params)
    model.eval()
    ids, mask, idx = r.prompts.input_ids, r.prompts.attention_mask, r.prompt_index
    comp, cmask = r.completion_ids, r.completion_mask
    with torch.no_grad():
        want = completion_outputs(model, ids, mask, idx, comp, cmask, False, False)
        got = position_packed(CausalLMCall(model), ids, mask, idx, comp, cmask)
        m = cmask.bool()
        assert (got[m] - want[m]).abs().max() <= 1e-5
        assert not got[~m].any()  # 0 past each completion's end

        class NoRestart(CausalLMCall):
            def forward(self, ids, mask, pos, cache, keep=0, generated=False):
                return super().forward(ids, mask, torch.arange(pos.shape[1])[None], cache, keep)

        joined = position_packed(NoRestart(model), ids, mask, idx, comp, cmask)
    assert (joined[m] - want[m]).abs().max() > 1e-2


class GeneratedApart(ModelCall):
    """A call whose sampled tokens are embedded apart from prompt tokens (as Janus' image
    codes are): exercises position packing's embed / run / logits branch."""

    def __init__(self, model):
        self.module = model
        self.shift = torch.nn.Parameter(torch.randn(model.config.hidden_size) * 0.5)

    @property
    def config(self):
        return self.module.config

    def embed(self, ids, generated):
        e = self.module.get_input_embeddings()(ids)
        return e + self.shift if generated else e

    def run(self, embeds, mask, pos, cache):
        kw = dict(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False)
        return self.module.model(**kw).last_hidden_state

    def logits(self, hidden):
        return self.module.lm_head(hidden)


def test_position_packing_embeds_generated_tokens_apart():
    model = tiny_qwen2(vocab_size=80)
    r = _rollout(model, PARAMS["eos_top_p"])
    call = GeneratedApart(model)
    args = (r.prompts.input_ids, r.prompts.attention_mask, r.prompt_index)
    args += (r.completion_ids, r.completion_mask)
    outs, grads = [], []
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        call.shift.grad = None
        if packed:
            out = position_packed(call, *args)
        else:
            out = completion_outputs(call, *args[:3], args[3], args[4], False, False)
        out = out * r.completion_mask[..., None]
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        outs.append(out.detach())
        grads.append(torch.cat([call.shift.grad, model.lm_head.weight.grad.flatten()]))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=0)


def test_the_configured_layout_is_chosen_and_checked(monkeypatch):
    """auto: position ids under a flash kernel, the 4D mask otherwise; set_packing's layout
    reaches the default scoring call (after its one-time check against padding)."""
    model = tiny_llama(vocab_size=80)
    body = model.model
    assert packing_mode(body) == ("mask", False)
    model.config._attn_implementation = "flash_attention_2"
    assert packing_mode(body) == ("position_ids", False)
    model.config._attn_implementation = "sdpa"
    ran = []
    real = scoring.position_packed
    monkeypatch.setattr(scoring, "position_packed", lambda *a: ran.append(1) or real(*a))
    params = PARAMS["eos_top_p"]
    r = _rollout(model, params)
    want = _grads(model, r, params, pack=False)
    set_packing(model, "position_ids")
    assert packing_mode(body) == ("position_ids", True)
    _check(_grads(model, r, params), want)
    assert len(ran) >= 2  # the check's run and the scoring pass
    set_packing(model, "off")
    ran.clear()
    _check(_grads(model, r, params), want, tol=0)
    assert not ran


def test_an_explicit_layout_the_model_cannot_run_is_refused():
    model = tiny_llama(vocab_size=80)
    model.config._attn_implementation = "flash_attention_2"  # no custom 4D masks
    set_packing(model, "mask")
    r = _rollout(tiny_llama(vocab_size=80), PARAMS["eos_top_p"])
    with pytest.raises(ConfigError, match="trainer.packing=mask.*auto or off"):
        token_logprobs(model, r, PARAMS["eos_top_p"])


def test_the_packing_option_is_validated():
    assert load_config(None, ["trainer.packing=position_ids"]).trainer.packing == "position_ids"
    with pytest.raises(ConfigError, match="trainer.packing='flash': use auto, mask"):
        load_config(None, ["trainer.packing=flash"])


def test_the_trainer_scores_with_its_configured_layout(tmp_path, monkeypatch):
    """trainer.packing = position_ids reaches the policy's and the frozen reference's scoring."""
    from test_decode_weights import _trainer

    ran = []
    real = scoring.position_packed
    monkeypatch.setattr(scoring, "position_packed", lambda *a: ran.append(a[0]) or real(*a))
    tr = _trainer(tmp_path, ["trainer.packing=position_ids", "algorithm.beta=0.05"])
    m = tr.train_step()
    assert tr.updates == 1 and torch.isfinite(torch.tensor(m["loss"]))
    modules = {id(call.module) for call in ran}
    assert id(tr.model.model) in modules  # the policy's body (fused head)
    assert id(tr.reference.module().model) in modules  # the frozen copy's


def test_position_packing_needs_no_cache_so_it_packs_under_gradient_checkpointing(monkeypatch):
    """Checkpointed training drops the KV cache, so the 4D-mask layout (after a shared prompt
    cache) cannot run; the position-id layout can."""
    ran = []
    real = scoring.position_packed
    monkeypatch.setattr(scoring, "position_packed", lambda *a: ran.append(1) or real(*a))
    model = tiny_llama(vocab_size=80)
    params = PARAMS["eos_top_p"]
    r = _rollout(model, params)
    want = _grads(model, r, params, share_prefix=False, pack=False)
    model.gradient_checkpointing_enable()
    model.train()
    assert not scoring.can_share_prefix(model)
    set_packing(model, "position_ids")
    _check(_grads(model, r, params), want)
    assert ran
