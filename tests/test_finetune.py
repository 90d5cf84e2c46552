"""Adapter fine-tuning (peft, LyCORIS) and its one-model reference: exactness of the reference
(disabled / multiplier 0 = base, bitwise), refresh, TR-DPO mix, save/load and merged export."""

import copy

import pytest
import torch

pytest.importorskip("peft", reason="the peft extra is not installed")
pytest.importorskip("lycoris", reason="the lycoris extra is not installed")

from grpo_ar.finetune import FinetuneConfig, build_finetune
from grpo_ar.io.checkpoint import load_tensors, save_tensors
from tiny import tiny_llama

VOCAB = 48
VARIANTS = {
    "peft-lora": dict(method="peft", algo="lora"),
    "peft-dora": dict(method="peft", algo="dora"),
    "lycoris-lora": dict(method="lycoris", algo="lora"),  # bypass mode (the default)
    "lycoris-lora-dense": dict(method="lycoris", algo="lora", bypass=False),
    "lycoris-dora": dict(method="lycoris", algo="dora"),
    "lycoris-loha": dict(method="lycoris", algo="loha"),
    "lycoris-lokr": dict(method="lycoris", algo="lokr", algo_args={"factor": 4}),
    "lycoris-ia3": dict(method="lycoris", algo="ia3"),
    "lycoris-full": dict(method="lycoris", algo="full"),
    "lycoris-diag-oft": dict(method="lycoris", algo="diag-oft"),
}
AFFINE = ("lycoris-ia3", "lycoris-full")


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (3, 11), generator=g)


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def build(name, seed=0, reference=True):
    model = tiny_llama(vocab_size=VOCAB, seed=seed)
    base = copy.deepcopy(model)
    cfg = FinetuneConfig(rank=4, alpha=8.0, **VARIANTS[name])
    return build_finetune(model, cfg, need_reference=reference), base


def train(ft, steps=3, seed=1, lr=3e-2):
    """A few optimizer steps of next-token cross-entropy on random tokens."""
    params = [p for p in ft.model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    x = inputs(seed)
    for _ in range(steps):
        out = ft.model(input_ids=x).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


def reference_logits(ft, x):
    with ft.reference.active():
        return logits(ft.model, x)


@pytest.mark.parametrize("name", VARIANTS)
def test_reference_is_the_base_bitwise_after_training(name):
    ft, base = build(name)
    x = inputs()
    train(ft)
    assert torch.equal(reference_logits(ft, x), logits(base, x))
    assert (logits(ft.model, x) - logits(base, x)).abs().max() > 1e-3  # the adapter trained
    assert torch.equal(logits(ft.model, x), logits(ft.model, x))  # policy restored after


@pytest.mark.parametrize("name", VARIANTS)
def test_after_refresh_reference_is_the_policy_before(name):
    ft, base = build(name)
    x = inputs()
    train(ft)
    before = logits(ft.model, x)
    ft.reference.refresh(ft.model)
    assert torch.equal(reference_logits(ft, x), before)
    train(ft, seed=2)
    assert torch.equal(reference_logits(ft, x), before)
    assert (logits(ft.model, x) - before).abs().max() > 1e-3


def test_reference_logprobs_through_the_adapter_equal_the_base():
    from grpo_ar.adapters.text import TextAdapter
    from grpo_ar.generation.params import SamplingParams
    from grpo_ar.io.data import load_rows
    from tiny import char_tokenizer

    tok = char_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    base = copy.deepcopy(model)
    ft = build_finetune(model, FinetuneConfig(method="lycoris", rank=4), need_reference=True)
    with torch.no_grad():
        for p in ft.model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    adapter = TextAdapter(tok, SamplingParams(max_new_tokens=6))
    entries = load_rows([{"prompt": f"{i}+1=", "rewards": "r"} for i in range(2)])
    gen = torch.Generator().manual_seed(0)
    rollout = adapter.sample(ft.model, adapter.encode(entries), 4, generator=gen)
    # the sampler runs on the wrapper; teacher forcing reproduces its log-probs
    policy, _ = adapter.token_logprobs(ft.model, rollout)
    torch.testing.assert_close(policy, rollout.sampling_logp, atol=1e-5, rtol=0)
    ref = ft.reference.logprobs(adapter, rollout)
    assert torch.equal(ref, adapter.token_logprobs(base, rollout)[0])
    assert not torch.equal(ref, policy)


def test_wrapper_mirrors_the_model_signature_and_delegates_attributes():
    import inspect

    ft, base = build("lycoris-lora")
    params = inspect.signature(type(ft.model).forward).parameters
    assert "logits_to_keep" in params and (
        {"cache", "past_key_values"} & set(params)
    )  # the fast paths see them
    out = ft.model(input_ids=inputs(), logits_to_keep=1)
    assert out.logits.shape == (3, 1, VOCAB)
    assert ft.model.config is ft.model.hf.config
    assert ft.model.get_output_embeddings() is ft.model.hf.lm_head
    names = {n for n, p in ft.model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("network.") for n in names)


@pytest.mark.parametrize("name", VARIANTS)
def test_save_load_reproduces_policy_and_reference(tmp_path, name):
    ft, _ = build(name)
    x = inputs()
    train(ft)
    ft.reference.refresh(ft.model)
    train(ft, seed=2)
    save_tensors(ft.state_dict(), tmp_path / "adapter.safetensors")
    save_tensors(ft.reference.state_dict(), tmp_path / "reference.safetensors")
    fresh, _ = build(name)
    fresh.load_state_dict(load_tensors(tmp_path / "adapter.safetensors"))
    fresh.reference.load_state_dict(load_tensors(tmp_path / "reference.safetensors"))
    assert torch.equal(logits(fresh.model, x), logits(ft.model, x))
    assert torch.equal(reference_logits(fresh, x), reference_logits(ft, x))
    # the adapter file holds only adapter tensors: far smaller than the model
    n_adapter = sum(t.numel() for t in ft.state_dict().values())
    n_model = sum(p.numel() for p in ft.model.parameters())
    assert n_adapter < n_model / 2 or name == "lycoris-full"


def test_reference_state_of_the_base_is_empty_and_round_trips(tmp_path):
    ft, base = build("peft-lora")
    train(ft)
    assert ft.reference.state_dict() == {}
    save_tensors(ft.reference.state_dict(), tmp_path / "r.safetensors")
    ft.reference.refresh(ft.model)
    ft.reference.load_state_dict(load_tensors(tmp_path / "r.safetensors"))
    assert torch.equal(reference_logits(ft, inputs()), logits(base, inputs()))


@pytest.mark.parametrize("name", [*VARIANTS, "full"])
def test_export_is_a_plain_model_equal_to_adapter_on(tmp_path, name):
    from transformers import AutoModelForCausalLM

    if name == "full":
        model = tiny_llama(vocab_size=VOCAB)
        ft = build_finetune(model, FinetuneConfig(), need_reference=False)
    else:
        ft, _ = build(name, reference=False)
    train(ft)
    ft.export(tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(merged).__name__ == "LlamaForCausalLM"
    x = inputs()
    torch.testing.assert_close(logits(merged, x), logits(ft.model, x), atol=1e-5, rtol=0)


def test_export_with_tied_embeddings(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(vocab_size=VOCAB)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    ft = build_finetune(model, FinetuneConfig(method="lycoris", algo="lokr"), False)
    train(ft)
    ft.export(tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    x = inputs()
    torch.testing.assert_close(logits(merged, x), logits(ft.model, x), atol=1e-5, rtol=0)


def merged_weights(ft, tmp_path, tag, reference=False):
    """The effective (merged) weights of the policy, or of the reference."""
    from safetensors.torch import load_file

    out = tmp_path / tag
    if reference:
        with ft.reference.active():
            ft.export(out)
    else:
        ft.export(out)
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("name", AFFINE)
def test_mix_is_the_weight_space_mix(tmp_path, name):
    """TR-DPO: W_ref <- α·W + (1 - α)·W_ref for the effective weights, from the base and from a
    refreshed reference."""
    ft, _ = build(name)
    train(ft)
    for step in range(2):  # step 0 mixes from the base, step 1 from a frozen copy
        w_ref = merged_weights(ft, tmp_path, f"r{step}", reference=True)
        w_pol = merged_weights(ft, tmp_path, f"p{step}")
        ft.reference.mix(ft.model, 0.3)
        w_new = merged_weights(ft, tmp_path, f"n{step}", reference=True)
        for k in w_new:
            want = 0.3 * w_pol[k] + 0.7 * w_ref[k]
            torch.testing.assert_close(w_new[k], want, atol=1e-6, rtol=0)
        assert any(not torch.equal(w_new[k], w_ref[k]) for k in w_new)
        train(ft, seed=2 + step)


def test_full_finetune_mix_and_alpha_one_is_refresh():
    model = tiny_llama(vocab_size=VOCAB)
    ft = build_finetune(model, FinetuneConfig(), need_reference=True)
    ref0 = {k: v.clone() for k, v in ft.reference.state_dict().items()}
    train(ft)
    ft.reference.mix(ft.model, 0.25)
    pol = ft.model.state_dict()
    for k, v in ft.reference.state_dict().items():
        torch.testing.assert_close(v, 0.25 * pol[k] + 0.75 * ref0[k], atol=1e-6, rtol=0)
    ft.reference.mix(ft.model, 1.0)
    assert all(torch.equal(v, pol[k]) for k, v in ft.reference.state_dict().items())


@pytest.mark.parametrize("name", [n for n in VARIANTS if n not in AFFINE])
def test_mix_refused_where_not_exact_but_alpha_one_refreshes(name):
    ft, _ = build(name)
    train(ft)
    with pytest.raises(ValueError, match="not exact here: .*product of its tensors"):
        ft.reference.mix(ft.model, 0.5)
    ft.reference.mix(ft.model, 1.0)
    x = inputs()
    assert torch.equal(reference_logits(ft, x), logits(ft.model, x))
    with pytest.raises(ValueError, match="0 < alpha <= 1"):
        ft.reference.mix(ft.model, 0.0)


def test_frozen_copy_state_round_trip_with_tied_weights(tmp_path):
    model = tiny_llama(vocab_size=VOCAB)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    ft = build_finetune(model, FinetuneConfig(), need_reference=True)
    train(ft)
    save_tensors(ft.state_dict(), tmp_path / "m.safetensors")
    save_tensors(ft.reference.state_dict(), tmp_path / "r.safetensors")
    fresh_model = tiny_llama(vocab_size=VOCAB, seed=5)
    fresh_model.config.tie_word_embeddings = True
    fresh_model.tie_weights()
    fresh = build_finetune(fresh_model, FinetuneConfig(), need_reference=True)
    fresh.load_state_dict(load_tensors(tmp_path / "m.safetensors"))
    fresh.reference.load_state_dict(load_tensors(tmp_path / "r.safetensors"))
    x = inputs()
    assert torch.equal(logits(fresh.model, x), logits(ft.model, x))
    assert torch.equal(logits(fresh.reference.model, x), logits(ft.reference.model, x))
    assert fresh_model.lm_head.weight.data_ptr() == fresh_model.model.embed_tokens.weight.data_ptr()


def test_peft_and_lycoris_lora_are_the_same_function():
    """Same rank, alpha and init (kaiming A, zero B) from the same RNG state: the two libraries'
    LoRA train along the same path."""
    a, _ = build("peft-lora")
    b, _ = build("lycoris-lora")
    train(a)
    train(b)
    x = inputs()
    torch.testing.assert_close(logits(a.model, x), logits(b.model, x), atol=1e-5, rtol=0)


def test_seeded_adapter_init_is_reproducible_and_leaves_the_global_rng():
    cfg = FinetuneConfig(method="lycoris", rank=4)
    models = [tiny_llama(vocab_size=VOCAB) for _ in range(2)]
    torch.manual_seed(7)
    before = torch.get_rng_state()
    a = build_finetune(models[0], cfg, False, seed=3).state_dict()
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched
    torch.manual_seed(123)  # another global state: the seed alone decides the init
    b = build_finetune(models[1], cfg, False, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["peft-lora", "lycoris-lora", "lycoris-ia3", "lycoris-full"])
def test_sampling_follows_the_trained_adapter(name):
    """The sampler's log-probs equal teacher-forced ones after training, also when the model was
    sampled before (while the adapter was still the identity): no fast path that reads the base
    weights directly may skip the adapter."""
    from grpo_ar.adapters.text import TextAdapter
    from grpo_ar.generation.params import SamplingParams
    from grpo_ar.io.data import load_rows
    from tiny import char_tokenizer

    tok = char_tokenizer()
    ft = build_finetune(
        tiny_llama(vocab_size=len(tok)), FinetuneConfig(rank=4, **VARIANTS[name]), False
    )
    adapter = TextAdapter(tok, SamplingParams(max_new_tokens=8))
    prompts = adapter.encode(load_rows([{"prompt": f"{i}+1=", "rewards": "r"} for i in range(2)]))
    adapter.sample(ft.model, prompts, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in ft.model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    rollout = adapter.sample(ft.model, prompts, 4, generator=torch.Generator().manual_seed(1))
    logp, _ = adapter.token_logprobs(ft.model, rollout)
    torch.testing.assert_close(logp, rollout.sampling_logp, atol=1e-4, rtol=0)
