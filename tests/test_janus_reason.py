"""T2I-R1-style plan-then-image on a tiny random-init transformers `JanusForConditionalGeneration`:
the "janus_interleaved" call (text ids, then image codes shifted by the text vocabulary, in one
sequence) under the shared span sampler and scorer. Sampled log-probs equal a naive reference
that calls Janus' own pieces (text embeddings / `prepare_embeddings_for_image_generation`, the
language model, `lm_head` / `generation_head`) and equal the teacher-forced ones; gradients of
each span reach its own head; images decode from the shifted codes. Training and configs:
test_janus_reason_train.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_janus import SIDE, K, janus_tokenizer, tiny_janus

from grpo_ar.adapters.janus import janus_trainable
from grpo_ar.adapters.janus_reason import (
    JanusInterleavedCall,
    JanusReasonT2IAdapter,
)
from grpo_ar.generation.decode_step import FastStep, fast_step_for, new_cache
from grpo_ar.generation.model_call import positions
from grpo_ar.generation.params import SamplingParams
from grpo_ar.generation.scoring import completion_outputs
from grpo_ar.generation.spans import span_sample
from grpo_ar.types import Entry

V, N = 96, SIDE * SIDE  # tiny_janus' text vocabulary; image codes per image
TEMPLATE = "<|User|>: {prompt}\n\n<|Assistant|>:"  # T2I-R1's reasoning prompt: > 128 positions
PROMPTS = ["a red cat", "two blue dogs"]
PLAN = [[3, 15]]  # the digits, "+" and "-" of the char tokenizer (boi closes the plan)


@pytest.fixture(scope="module")
def tok():
    return janus_tokenizer()


def reason_janus(seed: int = 0):
    """tiny_janus with its generation aligner scaled up: random init leaves the image codes'
    embeddings ~1e-5 (two small Linears), so without this the codes would barely reach the
    hidden states and a wrong code embedding could hide under the tolerances."""
    model = tiny_janus(seed)
    aligner = model.model.generation_aligner
    with torch.no_grad():
        aligner.fc1.weight.mul_(30.0)
        aligner.hidden_layers[0].weight.mul_(30.0)  # code embeddings' std ~0.04, text's ~0.02
    return model


@pytest.fixture(scope="module")
def model():
    return reason_janus()


def spans(boi, plan=None, image_temp=1.0):
    """Plan closed by <begin_of_image> (or fixed-length `plan` + a forced boi), then the codes."""
    first = (
        {"name": "plan", "close_token": boi, "allowed_ranges": PLAN, "temperature": 0.8}
        if plan is None
        else {"name": "plan", "length": plan, "allowed_ranges": [[0, V]]}
    )
    boi_span = {"name": "boi", "length": 1, "allowed_ranges": [[boi, boi + 1]]}
    image = {
        "name": "image",
        "length": N,
        "allowed_ranges": [[V, V + K]],
        "temperature": image_temp,
    }
    return [first, image] if plan is None else [first, boi_span, image]


def adapter(model, tok, plan=None, budget=40, **kw):
    boi = tok.convert_tokens_to_ids("<begin_of_image>")
    sampling = SamplingParams(max_new_tokens=budget, spans=spans(boi, plan, 1.2))
    return JanusReasonT2IAdapter(model, tok, sampling, template=TEMPLATE, **kw)


def entries(prompts=PROMPTS):
    return [Entry(p, ()) for p in prompts]


@torch.no_grad()
def naive_logprobs(model, ad, r):
    """Row by row, no cache, no padding: Janus' own embeddings of the prompt, plan and codes,
    its language model, then lm_head for text tokens and generation_head for image tokens,
    log-softmax over each span's allowed ids at its temperature."""
    out = torch.zeros_like(r.sampling_logp)
    p = r.prompts
    for i in range(len(r.completion_ids)):
        row = p.input_ids[r.prompt_index[i]][p.attention_mask[r.prompt_index[i]].bool()]
        comp = r.completion_ids[i][r.completion_mask[i].bool()]
        code = comp >= V
        emb = model.get_input_embeddings()(torch.cat([row, comp.masked_fill(code, 0)])).clone()
        emb[len(row) :][code] = model.prepare_embeddings_for_image_generation(comp[code] - V)
        hidden = model.model.language_model(inputs_embeds=emb[None]).last_hidden_state[0]
        h = hidden[len(row) - 1 : -1]  # (T_i, H): the states predicting each completion token
        for t, token in enumerate(comp.tolist()):
            span = ad.sampling.spans[int(r.span_ids[i, t])]
            if token >= V:  # the image span allows every code: generation_head's softmax
                z, target = model.model.generation_head(h[t]), token - V
            else:  # lm_head's logits of the span's ids (and its close token) alone
                ids = [x for lo, hi in span.allowed_ranges for x in range(lo, hi)]
                ids += [] if span.close_token is None else [span.close_token]
                z, target = model.lm_head(h[t])[ids], ids.index(token)
            out[i, t] = F.log_softmax(z.float() / span.temperature, -1)[target]
    return out


def test_embed_routes_each_position_and_logits_are_both_heads(model):
    """Per position: text ids -> text embeddings, V + c -> Janus' image-generation embedding of
    c (bitwise); logits = [lm_head | generation_head]; the allowed-range softmax of each head's
    block equals that head's own softmax."""
    call = JanusInterleavedCall(model)
    assert call.text_vocab == V and call.out_features == V + K
    ids = torch.tensor([[1, 5, V + 3, 7, V + 15], [V, V + 1, 9, 2, 4]])
    emb = call.embed(ids, True)
    code = ids >= V
    # the same batch of codes through HF's own image-generation embedding (same shapes: bitwise)
    assert torch.equal(emb[code], model.prepare_embeddings_for_image_generation(ids[code] - V))
    assert torch.equal(emb[~code], model.get_input_embeddings()(ids[~code]))
    assert torch.equal(
        call.embed(ids[:, :2] % V, False), model.get_input_embeddings()(ids[:, :2] % V)
    )
    h = torch.randn(3, 4, 32)
    z = call.logits(h)
    assert torch.equal(z[..., :V], model.lm_head(h))
    assert torch.equal(z[..., V:], model.model.generation_head(h))
    masked = z.clone()
    masked[..., :V] = float("-inf")
    torch.testing.assert_close(
        F.log_softmax(masked, -1)[..., V:], F.log_softmax(model.model.generation_head(h), -1),
        atol=1e-6, rtol=0,
    )  # fmt: skip


@pytest.mark.parametrize("plan", [None, 3])
def test_sampled_logprobs_equal_the_naive_heads_and_teacher_forcing(model, tok, plan):
    """A plan closed by <begin_of_image> (or 3 free text tokens + a forced boi), then N codes:
    the sampler's log-probs equal Janus' heads called directly (text tokens: lm_head's softmax
    over the plan's ids; codes: generation_head's softmax) and the span scorer's, to 1e-5."""
    ad = adapter(model, tok, plan=plan)
    boi = ad.boi
    r = ad.sample(model, ad.encode(entries()), 4, generator=torch.Generator().manual_seed(0))
    comp, m = r.completion_ids, r.completion_mask.bool()
    image = (r.span_ids == ad.image_index) & m
    assert bool(((comp >= V) == image)[m].all())  # codes exactly in the image span
    full = image.sum(1) == N
    assert bool(full.any())
    for i in full.nonzero().flatten().tolist():  # the image follows <begin_of_image>
        first = int(image[i].nonzero()[0])
        assert int(comp[i, first - 1]) == boi
    if plan is not None:
        assert bool((comp[:, plan] == boi).all()) and bool((r.sampling_logp[:, plan] == 0).all())
    else:
        lengths = (r.span_ids == 0).logical_and(m).sum(1)
        assert len(set(lengths.tolist())) > 1  # plans of several lengths
    torch.testing.assert_close(r.sampling_logp, naive_logprobs(model, ad, r), atol=1e-5, rtol=0)
    logp, ent = ad.token_logprobs(model, r, with_entropy=True)
    torch.testing.assert_close(logp, r.sampling_logp, atol=1e-5, rtol=0)
    assert ent is not None and bool((ent[image] <= np.log(K) + 1e-5).all())
    # the other scoring paths through the call: a full-sequence pass, packed completions
    call, p = ad.model_call(model), r.prompts
    args = (p.input_ids, p.attention_mask, r.prompt_index, comp, r.completion_mask)
    with torch.no_grad():
        shared = completion_outputs(call, *args, True, False)
        for share, pack in ((False, False), (True, True)):
            other = completion_outputs(call, *args, share, False, pack)
            torch.testing.assert_close(other[m], shared[m], atol=1e-5, rtol=0)


def test_sampled_frequencies_follow_each_heads_softmax(model, tok):
    """4000 draws of one text token then one code after one prompt: the text token's frequencies
    match softmax(lm_head(h) / 0.1) over all V ids, the code's the marginal of
    softmax(generation_head(h') / 0.02) over the text token (total variation within sampling
    noise, far below the distance to the uniform distribution)."""
    ad = adapter(model, tok)
    one = SamplingParams(max_new_tokens=2, spans=[
        {"name": "plan", "length": 1, "allowed_ranges": [[0, V]], "temperature": 0.1},
        {"name": "image", "length": 1, "allowed_ranges": [[V, V + K]], "temperature": 0.02},
    ])  # fmt: skip
    prompt = ad.encode(entries(["a cat"]))
    r = span_sample(ad.model_call(model), prompt, 4000, one, torch.Generator().manual_seed(0))
    with torch.no_grad():
        ids = torch.cat([prompt.input_ids.expand(V, -1), torch.arange(V)[:, None]], 1)  # (V, L+1)
        hidden = model.model.language_model(
            inputs_embeds=model.get_input_embeddings()(ids)
        ).last_hidden_state  # (V, L + 1, H)
        p_text = F.softmax(model.lm_head(hidden[0, -2]) / 0.1, -1)  # (V,)
        p_code = p_text @ F.softmax(model.model.generation_head(hidden[:, -1]) / 0.02, -1)  # (K,)
    tv = lambda counts, p: 0.5 * float((counts / counts.sum() - p).abs().sum())  # noqa: E731
    text = torch.bincount(r.completion_ids[:, 0], minlength=V).float()
    codes = torch.bincount(r.completion_ids[:, 1] - V, minlength=K).float()
    # 4000 draws from the exact distributions themselves land at TV 0.029 / 0.016 (seed 1)
    assert tv(text, p_text) < 0.06 and tv(codes, p_code) < 0.05
    assert tv(text, torch.full((V,), 1 / V)) > 0.4 and tv(codes, torch.full((K,), 1 / K)) > 0.4


def test_fast_decode_step_equals_the_call_on_text_and_codes(model, tok):
    """FastStep (Janus' Llama body, the routed embedding, the joint head) gives the call's own
    next-token logits after a text token and after a code; sampling with it and without it
    draws the same tokens."""
    call = JanusInterleavedCall(model)
    assert fast_step_for(call, 16) is not None
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    tok_ = torch.tensor([V + 3, 4])  # a code in one row, a text token in the other
    full = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    got, want = [], []
    for out, fast in ((got, True), (want, False)):
        cache = new_cache(call, 8)
        call.forward(ids, mask, positions(mask), cache, 1)
        if fast:
            out.append(FastStep(call, 8)(tok_, full, mask.sum(1), cache))
        else:
            out.append(
                call.forward(tok_[:, None], full, mask.sum(1)[:, None], cache, 1, True)[:, -1]
            )
    assert got[0].shape == (2, V + K)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)

    class NoFast(JanusInterleavedCall):
        def fast_parts(self):
            return None

    ad = adapter(model, tok)
    prompts = ad.encode(entries())
    a = span_sample(call, prompts, 2, ad.sampling, torch.Generator().manual_seed(3))
    b = span_sample(NoFast(model), prompts, 2, ad.sampling, torch.Generator().manual_seed(3))
    assert torch.equal(a.completion_ids, b.completion_ids)
    torch.testing.assert_close(a.sampling_logp, b.sampling_logp, atol=1e-5, rtol=0)


def test_gradients_reach_each_spans_head(tok):
    """The plan span's loss reaches lm_head (every row of its allowed ids, through the softmax)
    and not the generation path; the image span's reaches generation_head and the generation
    embeddings, and lm_head (tied to the text embeddings) only at ids present in the context."""
    model = reason_janus(seed=4)
    janus_trainable(model, ["generation", "language_model", "lm_head"])
    ad = adapter(model, tok)
    r = ad.sample(model, ad.encode(entries()), 2, generator=torch.Generator().manual_seed(1))
    m = r.completion_mask.bool()
    image = (r.span_ids == ad.image_index) & m
    seen = set(r.prompts.input_ids.flatten().tolist()) | set(r.completion_ids[~image].tolist())
    unseen = sorted(set(range(V)) - seen)
    for sel, name in ((m & ~image, "plan"), (image, "image")):
        model.zero_grad(set_to_none=True)
        logp, _ = ad.token_logprobs(model.train(), r)
        (logp * sel).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        gen = [n for n in grads if n.startswith("model.generation_") and bool(grads[n].any())]
        lm_head = model.lm_head.weight.grad
        assert (
            lm_head is not None and model.model.generation_head.vision_head.weight.grad is not None
        )
        if name == "plan":
            assert not gen, gen  # the plan's tokens never touch the generation path
            assert bool(lm_head[PLAN[0][0] : PLAN[0][1]].ne(0).all(-1).all())
        else:
            assert {n.split(".")[1] for n in gen} == {
                "generation_embeddings", "generation_aligner", "generation_head"
            }  # fmt: skip
            assert not bool(lm_head[unseen].any()) and bool(lm_head[sorted(seen)].any())
        assert bool(grads["model.language_model.layers.0.self_attn.q_proj.weight"].any())
    model.eval()


def test_decode_gives_plans_and_images_and_blanks_cut_rows(model, tok):
    """{"plan": text, "image"}: the image decoded from the codes shifted back (as transformers'
    decode_image_tokens decodes them); a row whose budget ended inside the plan gets a black
    image."""
    ad = adapter(model, tok, budget=N + 6, output="float")
    r = ad.sample(model, ad.encode(entries()), 8, generator=torch.Generator().manual_seed(2))
    codes, complete = ad.image_codes(r)
    assert bool(complete.any()) and not bool(complete.all())  # plans of up to 6 tokens fit
    assert bool(r.truncated[~complete].all())
    out = ad.decode(r)
    images = torch.stack([o["image"] for o in out])
    assert images.shape == (16, 3, 2 * SIDE, 2 * SIDE)
    hf = model.decode_image_tokens(codes[complete]).permute(0, 3, 1, 2)
    torch.testing.assert_close(images[complete], ((hf + 1) / 2).clamp(0, 1), atol=1e-6, rtol=0)
    assert not bool(images[~complete].any())
    i = int(complete.nonzero()[0])
    plan_ids = r.completion_ids[i][(r.span_ids[i] == 0) & r.completion_mask[i].bool()][:-1]
    assert out[i]["plan"] == tok.decode(plan_ids.tolist()) and "<begin" not in out[i]["plan"]
    assert ad.summarize(out[i]) == {"plan": out[i]["plan"], "image": [2 * SIDE, 2 * SIDE]}
    alone = adapter(model, tok, budget=N + 6, output="float", reward_input="image").decode(r)
    assert torch.equal(torch.stack(alone), images)  # the image alone, for built-in rewards
