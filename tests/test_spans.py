"""Typed token spans (generation/spans.py): each span's allowed tokens and boundaries in the
sampler, teacher-forced log-probs per span equal to the sampler's and to a naive loop, and each
span's mask and weights reaching the token objective exactly."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from grpo_ar.config.algorithm import AlgorithmConfig
from grpo_ar.core.kl import KL
from grpo_ar.generation.params import SamplingParams, Span, allowed_mask, transform_logits
from grpo_ar.generation.spans import span_logprobs, span_sample
from grpo_ar.train.step import token_terms
from grpo_ar.types import Entry, PromptBatch
from tiny import tiny_llama

V = 40
SPANS = (
    Span("plan", close_token=5, allowed_ranges=((10, 20),), temperature=1.5, top_k=6,
         loss_weight=0.5, kl_weight=2.0),
    Span("image", length=4, allowed_ranges=((20, 30),), temperature=0.8, top_p=0.9,
         loss_weight=1.0, kl_weight=0.0),
    Span("end", length=1, allowed_ranges=((2, 3),), loss_weight=0.25, kl_weight=1.0),
)  # fmt: skip
PARAMS = SamplingParams(max_new_tokens=12, spans=SPANS)


@pytest.fixture(scope="module")
def rollout():
    ids = torch.tensor([[0, 1, 5, 6], [1, 9, 8, 7]])
    prompts = PromptBatch(ids, (ids != 0).long(), [Entry("a", ()), Entry("b", ())])
    net = tiny_llama(V, seed=2)
    return net, span_sample(net, prompts, 4, PARAMS, torch.Generator().manual_seed(0))


def test_each_span_samples_its_own_tokens_and_switches_at_its_boundary(rollout):
    _, r = rollout
    complete = 0
    for row, ids, sid in zip(range(len(r)), r.completion_ids.tolist(), r.span_ids.tolist()):
        n = int(r.completion_mask[row].sum())
        ids, sid = ids[:n], sid[:n]
        assert sid == sorted(sid)  # spans in order
        plan = [x for x, s in zip(ids, sid) if s == 0]
        image = [x for x, s in zip(ids, sid) if s == 1]
        end = [x for x, s in zip(ids, sid) if s == 2]
        # the plan: allowed tokens, closed by 5 exactly when a later span follows
        assert all(10 <= x < 20 for x in plan[:-1]) and (plan[-1] == 5) == bool(image)
        assert all(20 <= x < 30 for x in image) and (len(image) == 4 or not end)
        assert end in ([], [2])
        assert bool(r.truncated[row]) == (end != [2])  # the budget ran out inside a span
        complete += end == [2]
    assert complete >= 4
    w = torch.tensor([0.5, 1.0, 0.25])[r.span_ids] * r.completion_mask
    torch.testing.assert_close(r.data["span_loss_weight"], w, atol=0, rtol=0)


def test_teacher_forced_log_probs_per_span_equal_the_sampler_and_a_naive_loop(rollout):
    net, r = rollout
    logp, ent = span_logprobs(net, r, PARAMS, with_entropy=True)
    torch.testing.assert_close(logp, r.sampling_logp, atol=2e-5, rtol=0)
    assert bool((ent[r.completion_mask == 0] == 0).all())
    for i in (0, 5):  # naive: the full sequence, each token under its span's transform
        p = r.prompts.attention_mask[r.prompt_index[i]].bool()
        prompt = r.prompts.input_ids[r.prompt_index[i]][p]
        n = int(r.completion_mask[i].sum())
        seq = torch.cat([prompt, r.completion_ids[i, :n]])[None]
        with torch.no_grad():
            logits = net(seq).logits[0, len(prompt) - 1 : -1]  # (n, V)
        for t in range(n):
            sp = SPANS[int(r.span_ids[i, t])].params(PARAMS)
            z = transform_logits(logits[t : t + 1], sp, allowed_mask(sp, V, logits.device))
            want = F.log_softmax(z, -1)[0, r.completion_ids[i, t]]
            torch.testing.assert_close(logp[i, t], want, atol=2e-5, rtol=0)


def test_each_span_mask_and_weight_reach_the_token_objective_exactly(rollout):
    net, r = rollout
    logp, _ = span_logprobs(net, r, PARAMS)
    logp = logp.detach().requires_grad_()
    mb = replace(r, data=dict(r.data))
    adv = torch.linspace(-1, 1, len(r))
    ref = logp.detach() - 0.1 * r.completion_mask
    mb.data.update(old_logp=logp.detach(), adv=adv, ref_logp=ref)
    a = AlgorithmConfig(beta=0.3)
    terms = token_terms(a, mb, logp, None, r.completion_mask, None)
    m = r.completion_mask
    wl, wk = r.data["span_loss_weight"], r.data["span_kl_weight"]
    # on-policy (ratio 1): the clipped term is -A; k3 with a log-ratio of 0.1 per token
    want = -adv[:, None] * m * wl + 0.3 * KL["k3"](logp.detach(), ref) * wk
    torch.testing.assert_close(terms.loss.detach(), want * m, atol=1e-6, rtol=0)
    # and the gradient each token's log-prob receives is its span's weighted one
    terms.loss.sum().backward()
    k3_grad = 1 - torch.exp(ref - logp.detach())  # d k3 / d logp
    grad_want = (-adv[:, None] * wl + 0.3 * k3_grad * wk) * m
    torch.testing.assert_close(logp.grad, grad_want, atol=1e-6, rtol=0)


def test_a_span_needs_exactly_one_boundary_rule():
    with pytest.raises(ValueError, match="exactly one of length > 0 or close_token"):
        Span("x")
    with pytest.raises(ValueError, match="exactly one"):
        Span("x", length=3, close_token=2)


def test_trainer_runs_typed_spans_from_the_config(tmp_path):
    from grpo_ar.adapters.text import TextAdapter
    from grpo_ar.config import load_config
    from grpo_ar.io.data import load_rows
    from grpo_ar.train.step import StepStats
    from grpo_ar.train.trainer import Trainer
    from tiny import char_tokenizer

    tok = char_tokenizer()  # ':' = 18, letters 20..45, digits 3..12, <eos> = 2
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(
        "[sampling]\nmax_new_tokens = 10\n"
        '[[sampling.spans]]\nname = "plan"\nclose_token = 18\nallowed_ranges = [[20, 46]]\n'
        "temperature = 1.5\nloss_weight = 0.5\n"
        '[[sampling.spans]]\nname = "grid"\nlength = 3\nallowed_ranges = [[3, 13]]\n'
        "top_k = 4\nkl_weight = 0.0\n"
        '[[sampling.spans]]\nname = "end"\nlength = 1\nallowed_ranges = [[2, 3]]\n'
    )
    sets = ["trainer.steps=2", "trainer.batch_size=2", "algorithm.group_size=4",
            "algorithm.beta=0.05", f"log.run_dir={tmp_path / 'run'}", "log.progress=false"]  # fmt: skip
    cfg = load_config(cfg_file, sets)
    net = tiny_llama(vocab_size=len(tok), seed=1)
    rows = [{"prompt": f"{i}+{i}=", "rewards": [{"name": "regex_format",
             "args": {"pattern": "[a-z]*:[0-9]{3}", "full_match": True}}]} for i in range(4)]  # fmt: skip
    tr = Trainer(cfg, net, TextAdapter(tok, cfg.sampling), load_rows(rows))
    r = tr.generate(load_rows(rows)[:2], StepStats())
    assert r.span_ids is not None and r.data["span_loss_weight"].shape == r.completion_ids.shape
    logp, _ = tr.adapter.token_logprobs(net, r)
    torch.testing.assert_close(logp, r.sampling_logp, atol=2e-5, rtol=0)
    history = tr.train()
    assert [h["step"] for h in history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert "plan" in (tmp_path / "run" / "config.yaml").read_text()


def test_an_fp64_model_samples_spans_and_scores_them_in_fp64():
    ids = torch.tensor([[0, 1, 5, 6]])
    prompts = PromptBatch(ids, (ids != 0).long(), [Entry("a", ())])
    net = tiny_llama(V, seed=2).double()
    r = span_sample(net, prompts, 4, PARAMS, torch.Generator().manual_seed(0))
    logp, _ = span_logprobs(net, r, PARAMS)
    assert r.sampling_logp.dtype == torch.float64  # as the plain sampler keeps them
    torch.testing.assert_close(logp, r.sampling_logp, atol=1e-10, rtol=0)
    assert bool((r.completion_mask.sum(-1) > 0).all())
