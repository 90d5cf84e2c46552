"""The vLLM backend against the real engine: its `sampling_logp` equals grpo_ar's teacher-forced
log-probs (the built-in sampler's distribution) to 1e-4, and a weight push changes them."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vllm_llama

from grpo_ar.adapters.text import TextAdapter
from grpo_ar.generation.params import SamplingParams
from grpo_ar.generation.scoring import token_logprobs
from grpo_ar.generation.vllm_backend import VllmBackend
from grpo_ar.io.data import load_rows
from tiny import char_tokenizer

PROMPTS = ["12+7=", "3*3=", "a b c", "99-1="]


def _setup(engine, params, model=None, version=0):
    tok = char_tokenizer()
    model = model if model is not None else tiny_vllm_llama(len(tok))
    adapter = TextAdapter(tok, params)
    backend = VllmBackend(engine, adapter.sampling)
    backend.sync(model, version)  # the engine holds exactly this model's weights
    prompts = adapter.encode(load_rows([{"prompt": p, "rewards": "x"} for p in PROMPTS]))
    return model, adapter, backend, prompts


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_new_tokens=16, temperature=0.7),
        SamplingParams(max_new_tokens=16, temperature=1.0, top_k=5),
        SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.8),
        SamplingParams(max_new_tokens=16, temperature=0.8, top_k=20, top_p=0.9, min_new_tokens=3),
        SamplingParams(max_new_tokens=16, temperature=0.7, allowed_ranges=((3, 13), (40, 50))),
    ],
    ids=["temperature", "top_k", "top_p", "top_k_top_p_min_tokens", "allowed_ranges"],
)
def test_sampling_logp_equals_teacher_forced_logprobs(engine, params):
    model, adapter, backend, prompts = _setup(engine, params, version=hash(params))
    gen = torch.Generator().manual_seed(0)
    rollout = backend.generate(model, prompts, 8, generator=gen)
    assert rollout.completion_ids.shape[0] == len(PROMPTS) * 8
    mask = rollout.completion_mask.bool()
    assert int(mask.sum()) >= 40  # enough tokens for the comparison to mean something
    with torch.no_grad():
        logp, _ = adapter.token_logprobs(model, rollout)
    diff = (logp - rollout.sampling_logp).abs()[mask]
    assert float(diff.max()) <= 1e-4
    assert bool((rollout.sampling_logp[mask] < 0).any())  # not all forced tokens
    eos = adapter.sampling.eos_token_ids
    ended = torch.isin(rollout.completion_ids, torch.tensor(eos)).any(1)
    assert torch.equal(rollout.truncated, ~ended)
    lengths = rollout.lengths
    assert bool((lengths > params.min_new_tokens).all())  # EOS banned before min_new_tokens
    if params.allowed_ranges:
        ok = torch.zeros(len(char_tokenizer()) + 8, dtype=torch.bool)
        for lo, hi in params.allowed_ranges:
            ok[lo:hi] = True
        ok[list(eos)] = True
        assert bool(ok[rollout.completion_ids[mask]].all())


def test_weight_push_makes_the_engine_sample_the_new_policy(engine):
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    old, adapter, backend, prompts = _setup(engine, params, version=100)
    new = tiny_vllm_llama(len(char_tokenizer()), seed=1)  # another policy, same shapes
    backend.sync(new, 101)
    rollout = backend.generate(new, prompts, 4, generator=torch.Generator().manual_seed(1))
    mask = rollout.completion_mask.bool()
    with torch.no_grad():
        logp_new, _ = token_logprobs(new, rollout, adapter.sampling)
        logp_old, _ = token_logprobs(old, rollout, adapter.sampling)
    assert float((logp_new - rollout.sampling_logp).abs()[mask].max()) <= 1e-4
    assert float((logp_old - rollout.sampling_logp).abs()[mask].mean()) > 0.5  # visibly moved
    backend.sync(new, 101)  # the same version again is not re-pushed
    assert backend.version == 101 and engine.version == 101


def test_same_seed_same_rollout(engine):
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    model, _, backend, prompts = _setup(engine, params, version=200)
    a = backend.generate(model, prompts, 4, generator=torch.Generator().manual_seed(5))
    b = backend.generate(model, prompts, 4, generator=torch.Generator().manual_seed(5))
    c = backend.generate(model, prompts, 4, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert not torch.equal(a.completion_ids, c.completion_ids)


def test_peft_adapter_is_pushed_merged(engine):
    """A peft LoRA run pushes base + adapter merged: the engine samples the adapted policy."""
    from grpo_ar.finetune import build_finetune
    from grpo_ar.finetune.base import FinetuneConfig

    tok = char_tokenizer()
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    ft = build_finetune(tiny_vllm_llama(len(tok)), FinetuneConfig(method="peft"), False, seed=0)
    with torch.no_grad():  # LoRA's B starts at zero: move it so the adapter changes outputs
        for name, p in ft.trainable().items():
            p.copy_(torch.randn_like(p) * (0.5 if "lora_B" in name else 1.0))
    adapter = TextAdapter(tok, params)
    backend = VllmBackend(engine, adapter.sampling, finetune=ft)
    backend.sync(ft.model, 300)
    prompts = adapter.encode(load_rows([{"prompt": p, "rewards": "x"} for p in PROMPTS]))
    rollout = backend.generate(ft.model, prompts, 4, generator=torch.Generator().manual_seed(2))
    mask = rollout.completion_mask.bool()
    with torch.no_grad():
        logp, _ = token_logprobs(ft.model, rollout, adapter.sampling)
        with ft.adapter_off():
            base, _ = token_logprobs(ft.model, rollout, adapter.sampling)
    assert float((logp - rollout.sampling_logp).abs()[mask].max()) <= 1e-4
    assert float((base - rollout.sampling_logp).abs()[mask].mean()) > 0.1  # not the base
