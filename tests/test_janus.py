"""Janus-Pro text-to-image through the model-call seam, on a tiny random-init instance of the real
transformers `JanusForConditionalGeneration` (built offline from a JanusConfig): teacher-forced
log-probs equal the sampler's, greedy codes equal transformers' own
`generate(generation_mode="image")`, only the configured parts train, codes decode to pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grpo_ar.adapters.janus import (
    JANUS_T2I_TEMPLATE,
    JanusImageCall,
    JanusT2IAdapter,
    JanusT2IConfig,
    janus_trainable,
)
from grpo_ar.config import load_config
from grpo_ar.errors import ConfigError
from grpo_ar.generation.decode_step import fast_step_for
from grpo_ar.generation.params import SamplingParams
from grpo_ar.generation.scoring import token_logprobs
from grpo_ar.io.data import load_rows
from grpo_ar.rewards import RewardComputer
from grpo_ar.testing import CHARS, word_level_tokenizer
from grpo_ar.train.trainer import Trainer
from grpo_ar.types import Entry

SIDE, K = 4, 16  # a 4x4 code grid, 16 codes
PROMPTS = ["a red cat", "two blue dogs"]


def tiny_janus(seed: int = 0, vocab: int = 96):
    """JanusForConditionalGeneration: Llama text model (hidden 32, 2 layers), a 1-layer vision
    tower, a JanusVQVAE with a 4x4 grid of 16 codes (8x8 pixels); generation head scaled up so
    its distributions are peaked and CFG matters."""
    from transformers import (
        JanusConfig,
        JanusForConditionalGeneration,
        JanusVisionConfig,
        JanusVQVAEConfig,
        LlamaConfig,
    )

    torch.manual_seed(seed)
    text = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    vision = JanusVisionConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=4 * SIDE,
        patch_size=4, projection_dim=32, num_image_tokens=SIDE * SIDE, depth=1, mlp_ratio=2.0,
    )  # fmt: skip
    vq = JanusVQVAEConfig(
        embed_dim=4, num_embeddings=K, latent_channels=32, base_channels=32,
        channel_multiplier=[1, 1], num_res_blocks=1, projection_dim=32, image_token_embed_dim=32,
    )  # fmt: skip
    cfg = JanusConfig(
        text_config=text, vision_config=vision, vq_config=vq, image_token_id=vocab - 1
    )
    model = JanusForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.model.generation_head.vision_head.weight.mul_(8.0)
    return model


def janus_tokenizer():
    """Char-level tokenizer with Janus' chat and image-start tokens (pad 0, bos 1)."""
    tok = word_level_tokenizer([*CHARS, "\n"], chars=True)
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|User|>", "<|Assistant|>", "<begin_of_image>"]}
    )
    return tok


@pytest.fixture(scope="module")
def tok():
    return janus_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_janus()


def adapter(model, tok, cfg_scale=1.0, temperature=1.0, **kw):
    sampling = SamplingParams(cfg_scale=cfg_scale, temperature=temperature)
    return JanusT2IAdapter(model, tok, sampling, **kw)


def entries(prompts=PROMPTS):
    return [Entry(p, ()) for p in prompts]


def test_prompt_template_and_hf_unconditional_prompt(model, tok):
    """Cond: BOS + template + <begin_of_image>; uncond: every other token pad, all attended —
    transformers' rule (`input_tokens != bos & != boi -> pad`) applied to the cond row."""
    ad = adapter(model, tok, cfg_scale=5.0)
    batch = ad.encode(entries(["a red cat"]))
    boi = tok.convert_tokens_to_ids("<begin_of_image>")
    want = tok(JANUS_T2I_TEMPLATE.format(prompt="a red cat"))["input_ids"] + [boi]
    assert batch.input_ids[0].tolist() == want
    assert tok.convert_ids_to_tokens(want[:2]) == ["<bos>", "<|User|>"]
    cond = batch.input_ids
    hf_uncond = cond.masked_fill((cond != tok.bos_token_id) & (cond != boi), tok.pad_token_id)
    assert torch.equal(batch.uncond_input_ids, hf_uncond)
    assert torch.equal(batch.uncond_attention_mask, batch.attention_mask)


@pytest.mark.parametrize("cfg_scale", [1.0, 5.0])
def test_teacher_forced_logprobs_equal_the_samplers(model, tok, cfg_scale):
    """Every scoring path (fused generation head + packed, logits path, full-sequence pass)
    recomputes the sampler's log-probs of Janus image codes to 1e-5."""
    ad = adapter(model, tok, cfg_scale=cfg_scale, temperature=0.9)
    prompts = ad.encode(entries())
    r = ad.sample(model, prompts, 3, generator=torch.Generator().manual_seed(0))
    assert r.completion_ids.shape == (6, SIDE * SIDE)
    assert int(r.completion_ids.max()) < K and r.completion_mask.all()
    logp, _ = ad.token_logprobs(model, r)
    torch.testing.assert_close(logp, r.sampling_logp, atol=1e-5, rtol=0)
    call = ad.model_call(model)
    for kw in ({"fused": False}, {"share_prefix": False}, {"pack": False}):
        lp, _ = token_logprobs(call, r, ad.sampling, **kw)
        torch.testing.assert_close(lp, r.sampling_logp, atol=1e-5, rtol=0)
    # the default causal-LM call of the same model (text embeddings, lm_head) is another model
    plain, _ = token_logprobs(model, r, ad.sampling)
    assert float((plain.detach() - r.sampling_logp).abs().max()) > 1e-2
    assert float(r.sampling_logp.mean()) > -np.log(K)  # peaked: not the uniform distribution


@pytest.mark.parametrize("guidance", [2.0, 5.0])
def test_greedy_codes_equal_transformers_generate(model, tok, guidance):
    """Greedy codes equal `JanusForConditionalGeneration.generate(generation_mode="image",
    do_sample=False, guidance_scale=g)` for the same prompts (same length: HF numbers positions
    from the cache, not the mask), with the fast decode step and without."""
    ad = adapter(model, tok, cfg_scale=guidance)
    prompts = ad.encode(entries(["a red cat", "a big dog"]))
    assert bool(prompts.attention_mask.all())  # no left padding
    gc = model.generation_config
    gc.bos_token_id, gc.pad_token_id = tok.bos_token_id, tok.pad_token_id
    gc.generation_kwargs = {"boi_token_id": tok.convert_tokens_to_ids("<begin_of_image>")}
    want = model.generate(
        prompts.input_ids, attention_mask=prompts.attention_mask, generation_mode="image",
        do_sample=False, guidance_scale=guidance,
    )  # fmt: skip
    call = ad.model_call(model)
    assert fast_step_for(call, 32) is not None  # Janus' Llama + generation head: fast path
    got = ad.sample(model, prompts, 1, greedy=True)
    assert torch.equal(got.completion_ids, want)
    from grpo_ar.generation.sampler import sample

    for kw in ({"fast": False}, {"use_cache": False}):  # HF decode steps; no cache at all
        slow = sample(call, prompts, 1, ad.sampling, greedy=True, **kw)
        assert torch.equal(slow.completion_ids, want)
    assert len(set(map(tuple, want.tolist()))) == 2  # the prompts lead to different images


def test_decoded_images_have_the_vq_size_and_range(model, tok):
    ad = adapter(model, tok, output="float")
    r = ad.sample(model, ad.encode(entries()), 2, generator=torch.Generator().manual_seed(1))
    images = torch.stack(ad.decode(r))
    assert images.shape == (4, 3, 2 * SIDE, 2 * SIDE)  # spatial factor 2
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert float(images.std()) > 0.0
    # the VQ decodes the same codes as transformers' own decode_image_tokens ([-1, 1], HWC)
    hf = model.decode_image_tokens(r.completion_ids).permute(0, 3, 1, 2)
    torch.testing.assert_close(images, ((hf + 1) / 2).clamp(0, 1), atol=1e-6, rtol=0)


def test_wrong_models_and_parts_refused(model, tok):
    from grpo_ar.testing import tiny_llama

    with pytest.raises(ValueError, match="JanusForConditionalGeneration"):
        JanusImageCall(tiny_llama())
    with pytest.raises(ConfigError, match=r"janus_t2i.train=\['vq'\]: name one or more"):
        JanusT2IConfig(train=["vq"])
    with pytest.raises(ConfigError, match=r"janus_t2i.prompt_template needs \{prompt\}"):
        JanusT2IConfig(prompt_template="no slot")
    # direct callers of janus_trainable (no config section): the message names the function
    with pytest.raises(ConfigError, match=r"janus_trainable parts=\['vq'\]: name one or more"):
        janus_trainable(model, ["vq"])
    with pytest.raises(ConfigError, match="janus_t2i.decode_batch_size must be >= 0"):
        JanusT2IConfig(decode_batch_size=-1)
    with pytest.raises(ValueError, match="no '<boi>' token"):
        adapter(model, tok, boi_token="<boi>")


def _trainer(tmp_path, model, tok, overrides=()):
    cfg = load_config(
        None,
        [
            "sampling.cfg_scale=3.0", "trainer.steps=2", "trainer.batch_size=2",
            "trainer.lr=1e-2", "algorithm.group_size=4", f"log.run_dir={tmp_path}",
            "log.progress=false", "algorithm.beta=0.04", *overrides,
        ],
    )  # fmt: skip
    ad = JanusT2IAdapter(model, tok, cfg.sampling)
    rows = load_rows([{"prompt": p, "rewards": "aesthetic_proxy"} for p in PROMPTS])
    return Trainer(cfg, model, ad, rows, rewards=RewardComputer(names=["aesthetic_proxy"]))


@pytest.mark.parametrize("parts", [None, ["generation"], ["generation", "lm_head"]])
def test_trainer_steps_change_only_the_configured_parts(tmp_path, tok, parts):
    """Two GRPO steps with an image reward: the trained parts move, everything else (the
    understanding lm_head tied to the text embeddings, the vision tower, the VQ) stays bitwise."""
    model = tiny_janus(seed=1)
    names = janus_trainable(model) if parts is None else janus_trainable(model, parts)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lm_head = model.lm_head.weight.detach().clone()
    history = _trainer(tmp_path, model, tok).train()
    assert len(history) == 2 and all(np.isfinite(m["loss"]) for m in history)
    assert all(0.0 <= m["reward/mean"] <= 1.0 for m in history)
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed <= set(names)
    assert any(n.startswith("model.generation_head.") for n in changed)
    lm_changed = any(n.startswith("model.language_model.layers.") for n in changed)
    assert lm_changed == (parts is None)
    for frozen in ("model.vision_model.", "model.vqmodel.", "model.aligner."):
        assert not any(n.startswith(frozen) for n in changed)
    # lm_head is tied to the text embeddings: trained only when asked, and then it moves
    # (the prompt's text embeddings are in the graph, lm_head itself is not)
    asked = parts is not None and "lm_head" in parts
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert model.lm_head.weight.requires_grad == asked
    assert (not torch.equal(lm_head, model.lm_head.weight.detach())) == asked


def test_cli_builds_and_trains_janus_from_config(tmp_path, tok):
    """`grpo-ar train` with model.adapter = "janus_t2i": model and tokenizer from model.path,
    [janus_t2i] trained parts, CFG, an image reward; images written as sample files."""
    import json

    from grpo_ar.cli import build_model_and_adapter
    from grpo_ar.testing import cli_train

    path, data = tmp_path / "janus", tmp_path / "train.jsonl"
    tiny_janus(seed=2).save_pretrained(path)
    tok.save_pretrained(path)
    data.write_text(
        "\n".join(json.dumps({"prompt": p, "rewards": "aesthetic_proxy"}) for p in PROMPTS)
    )
    sets = [
        f"model.path={path}", "model.adapter=janus_t2i", 'janus_t2i.train=["generation"]',
        f"sampling.max_new_tokens={SIDE * SIDE}", "sampling.cfg_scale=3.0", f"data.train={data}",
        "algorithm.group_size=2", "trainer.batch_size=2", "trainer.steps=1", "trainer.lr=1e-3",
        f"log.run_dir={tmp_path / 'run'}", "log.progress=false",
    ]  # fmt: skip
    model, ad = build_model_and_adapter(load_config(overrides=sets))
    assert isinstance(ad, JanusT2IAdapter) and isinstance(ad.model_call(model), JanusImageCall)
    ad.save_tokenizer(tmp_path / "export")
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert again.convert_tokens_to_ids("<begin_of_image>") == tok.convert_tokens_to_ids(
        "<begin_of_image>"
    )
    trained = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"generation_embeddings", "generation_aligner", "generation_head"}
    metrics, samples = cli_train(tmp_path, "janus_t2i", sets)
    assert metrics[-1]["step"] == 1 and 0 <= metrics[-1]["reward/mean"] <= 1
    assert samples and all((tmp_path / "run" / s["output"]).is_file() for s in samples)


@pytest.mark.parametrize("method", ["peft", "lycoris"])
def test_lora_on_the_language_model_and_generation_head(tok, method):
    """finetune.method = peft / lycoris wraps Janus (AdaptedLM); the janus_image call reaches its
    adapted modules: log-probs equal the sampler's, gradients reach the head's adapter (the
    fused head path, which reads vision_head.weight alone, steps aside for an adapted head)."""
    from grpo_ar.finetune import FinetuneConfig, build_finetune

    targets = r"model\.(language_model\..*_proj|generation_head\.(proj_out|vision_head))"
    cfg = FinetuneConfig(method=method, target_modules=(), target_regex=targets)
    # fp64: with adapters this far from their start and CFG 5, fp32 rounding alone reaches 2e-5
    ft = build_finetune(tiny_janus(seed=3).double(), cfg, need_reference=False)
    ft.model.double()
    ad = adapter(ft.model, tok, cfg_scale=5.0)
    assert ad.model_call(ft.model).head_split() is None
    with torch.no_grad():  # adapters away from their identity start, so they change logits
        for name, p in ft.trainable().items():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    assert all(p.dtype == torch.float64 for p in ft.model.parameters())
    r = ad.sample(ft.model, ad.encode(entries()), 2, generator=torch.Generator().manual_seed(0))
    logp, _ = ad.token_logprobs(ft.model.train(), r)
    torch.testing.assert_close(logp.detach(), r.sampling_logp, atol=1e-10, rtol=0)
    logp.sum().backward()
    moved = {n for n, p in ft.trainable().items() if p.grad is not None and bool(p.grad.any())}
    for layer in ("proj_out", "vision_head", "q_proj"):
        assert any(layer in n for n in moved), (layer, sorted(moved))
