"""Position-wise allowed tokens (`SamplingParams.position_ranges`): forced tokens sit exactly at
their positions with log-prob 0, positional ranges hold, and teacher-forced log-probs equal the
sampler's on every path (cached/uncached, prefix-shared or not, fused head or logits, CFG).
The Emu3 image layout (EOL after each row, EOF at the end) through ImageAdapter uses it."""

import pytest
import torch
from test_vq import K, tiny_emu3_vq

from grpo_ar.adapters.image import ClassCondition, ImageAdapter
from grpo_ar.adapters.vq import CodeLayout, Emu3VQ, strip_row_ends, with_row_ends
from grpo_ar.config import load_config
from grpo_ar.generation.params import SamplingParams, cfg_combine
from grpo_ar.generation.sampler import sample
from grpo_ar.generation.scoring import token_logprobs
from grpo_ar.types import Entry, PromptBatch
from tiny import tiny_llama

V = 80
RULES = ((2, 5, 6), (5, 7, 8), (5, 60, 62), (9, 3, 4))  # forced 5 at 2, {7, 60, 61} at 5, 3 at 9
FORCED = {2: 5, 9: 3}


def prompts(cfg=False):
    ids = torch.tensor([[0, 5, 6, 7], [3, 4, 5, 6]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    pb = PromptBatch(ids, mask, [Entry("a", ()), Entry("b", ())])
    if cfg:
        pb.uncond_input_ids, pb.uncond_attention_mask = torch.tensor([[0, 1], [1, 1]]), mask[:, 2:]
    return pb


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=V)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


CASES = {
    "plain": dict(temperature=0.8),
    "filters": dict(temperature=1.2, top_k=6, top_p=0.9),
    "cfg": dict(cfg_scale=3.0, top_p=0.95),
}


@torch.no_grad()
def naive_logprobs(model, r, params):
    """Per sample: one unpadded forward per CFG branch, the positional allowed set by hand."""
    vocab = model.config.vocab_size
    out = []
    for i in range(len(r)):
        j, comp = int(r.prompt_index[i]), r.completion_ids[i]

        def branch(ids, mask, j=j, comp=comp):
            full = torch.cat([ids[j][mask[j].bool()], comp])
            return model(full[None]).logits[0, -comp.shape[0] - 1 : -1]

        pb = r.prompts
        z = branch(pb.input_ids, pb.attention_mask)
        if params.uses_cfg:
            u = branch(pb.uncond_input_ids, pb.uncond_attention_mask)
            z = cfg_combine(z, u, params.cfg_scale)
        z = z / params.temperature
        for t in range(z.shape[0]):
            keep = torch.zeros(vocab, dtype=torch.bool)
            rules = [(lo, hi) for p, lo, hi in params.position_ranges if p == t]
            for lo, hi in rules or params.allowed_ranges or [(0, vocab)]:
                keep[lo:hi] = True
            z[t, ~keep] = float("-inf")
            if params.top_k:
                z[t, z[t] < z[t].topk(params.top_k).values[-1]] = float("-inf")
            if params.top_p < 1:
                p, order = z[t].softmax(-1).sort(descending=True)
                drop = (p.cumsum(-1) - p) >= params.top_p
                z[t, order[drop]] = float("-inf")
        out.append(z.log_softmax(-1).gather(-1, comp[:, None])[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("case", list(CASES))
def test_forced_tokens_placed_and_logprobs_match_every_path(model, case):
    params = SamplingParams(
        max_new_tokens=10, allowed_ranges=((10, 40),), position_ranges=RULES, **CASES[case]
    )
    pb = prompts(params.uses_cfg)
    r = sample(model, pb, 8, params, generator=gen(1))
    ids = r.completion_ids
    for t, tok in FORCED.items():
        assert (ids[:, t] == tok).all()
        assert (r.sampling_logp[:, t] == 0).all()  # probability exactly 1
    assert set(ids[:, 5].tolist()) <= {7, 60, 61} and len(set(ids[:, 5].tolist())) > 1
    free = [t for t in range(10) if t not in (2, 5, 9)]
    assert ((ids[:, free] >= 10) & (ids[:, free] < 40)).all()
    assert (r.sampling_logp[:, free] < 0).all()

    ref = naive_logprobs(model, r, params)
    torch.testing.assert_close(r.sampling_logp, ref, atol=1e-5, rtol=0)
    for kw in (dict(), dict(fused=False), dict(share_prefix=False)):
        logp, ent = token_logprobs(model, r, params, with_entropy=True, **kw)
        torch.testing.assert_close(logp, r.sampling_logp, atol=1e-5, rtol=0)
        assert (ent[:, [2, 9]] == 0).all() and (ent[:, free] > 0).all()
    # without the rules the same tokens score differently: the rules are really applied
    plain, _ = token_logprobs(model, r, SamplingParams(max_new_tokens=10, **CASES[case]))
    assert (plain[:, 2] < -0.1).all()


def test_forced_positions_carry_no_gradient(model):
    params = SamplingParams(max_new_tokens=10, allowed_ranges=((10, 40),), position_ranges=RULES)
    r = sample(model, prompts(), 4, params, generator=gen(2))
    w = torch.zeros(r.completion_ids.shape)
    w[:, [2, 9]] = 1.0
    model.zero_grad()
    (token_logprobs(model, r, params)[0] * w).sum().backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())
    model.zero_grad()


def test_cached_uncached_and_greedy_sampling_respect_the_rules(model):
    params = SamplingParams(
        max_new_tokens=10, allowed_ranges=((10, 40),), position_ranges=RULES, cfg_scale=2.0
    )
    pb = prompts(cfg=True)
    a = sample(model, pb, 3, params, generator=gen(3))
    b = sample(model, pb, 3, params, generator=gen(3), use_cache=False, fast=False)
    assert torch.equal(a.completion_ids, b.completion_ids)
    torch.testing.assert_close(a.sampling_logp, b.sampling_logp, atol=1e-5, rtol=0)
    g = sample(model, pb, 1, params, greedy=True)
    assert (g.completion_ids[:, 2] == 5).all() and (g.completion_ids[:, 9] == 3).all()
    assert (g.sampling_logp[:, [2, 9]] == 0).all()


def test_rules_with_eos_and_min_new_tokens(model):
    # EOS forced at position 4 ends every row there at the latest; EOS is banned before 2
    params = SamplingParams(
        max_new_tokens=8, eos_token_ids=(2,), min_new_tokens=2, position_ranges=((4, 2, 3),)
    )
    r = sample(model, prompts(), 8, params, generator=gen(4))
    assert r.completion_ids.shape[1] <= 5 and not r.truncated.any()
    lengths = r.completion_mask.sum(1).long()
    assert (lengths >= 3).all() and (lengths <= 5).all()
    logp, _ = token_logprobs(model, r, params)
    torch.testing.assert_close(logp, r.sampling_logp, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(position_ranges=((10, 5, 6),)), r"needs 0 <= t < max_new_tokens=10"),
        (dict(position_ranges=((1, 6, 6),)), "0 <= lo < hi"),
        (dict(position_ranges=((1, 6),)), r"\(t, lo, hi\) int triples"),
        (
            dict(position_ranges=((1, 2, 3),), eos_token_ids=(2,), min_new_tokens=3),
            "allow only EOS at position 1 < min_new_tokens=3",
        ),
    ],
)
def test_bad_rules_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(max_new_tokens=10, **kw)


def test_rule_beyond_the_vocabulary_rejected(model):
    params = SamplingParams(max_new_tokens=3, position_ranges=((1, 70, 90),))
    with pytest.raises(ValueError, match=r"position range \[70, 90\) exceeds the vocabulary of 80"):
        sample(model, prompts(), 1, params)


def test_config_carries_position_ranges():
    cfg = load_config(None, ["sampling.max_new_tokens=4", "sampling.position_ranges=[[0,5,6]]"])
    assert cfg.sampling.position_ranges == ((0, 5, 6),)


# -- the Emu3 image layout through ImageAdapter --------------------------------------------------
# pad 0, BOS 1, classes 2..5, null 6, BOI 7, EOL 8, EOF 9, codes 10..25
EOL, EOF, OFFSET, GRID = 8, 9, 10, (4, 6)
N_TOK = GRID[0] * (GRID[1] + 1) + 1


@pytest.fixture(scope="module")
def emu3():
    return Emu3VQ(tiny_emu3_vq())


def emu3_adapter(dec, **kw):
    sampling = kw.pop("sampling", SamplingParams(max_new_tokens=N_TOK, cfg_scale=3.0, top_k=8))
    cond = ClassCondition(class_offset=2, num_classes=4, bos_token_id=1)
    return ImageAdapter(
        dec, sampling, GRID, OFFSET, cond, [7], eol_token_id=EOL, eof_token_id=EOF, **kw
    )


def test_emu3_image_layout_sampled_scored_and_decoded(emu3):
    lm = tiny_llama(vocab_size=OFFSET + K, seed=3)
    ad = emu3_adapter(emu3)
    r = ad.sample(lm, ad.encode([Entry(0, ()), Entry(3, ())]), 3, generator=gen(5))
    ids = r.completion_ids
    assert ids.shape == (6, N_TOK)
    codes = strip_row_ends(ids, GRID[1], EOL, EOF)  # EOL ends every row, EOF the image
    assert torch.equal(with_row_ends(codes, GRID[1], EOL, EOF), ids)
    assert ((codes >= OFFSET) & (codes < OFFSET + K)).all()
    layout = ad.layout.template >= 0
    assert layout.sum() == 5 and (r.sampling_logp[:, layout] == 0).all()
    logp, _ = ad.token_logprobs(lm, r)
    torch.testing.assert_close(logp, r.sampling_logp, atol=1e-5, rtol=0)
    want = ((emu3.decode((codes - OFFSET).view(6, *GRID)) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(ad.decode_pixels(r), want, atol=0, rtol=0)
    assert ad.decode(r)[0].size == (12, 8)


def test_emu3_layout_errors(emu3):
    with pytest.raises(
        ValueError, match=r"grid 4x6 = 24 codes \+ 5 EOL/EOF = 29 tokens; remove it"
    ):
        emu3_adapter(emu3, sampling=SamplingParams(max_new_tokens=24))
    with pytest.raises(ValueError, match="conflicts with the EOL/EOF layout tokens' positions"):
        emu3_adapter(
            emu3, sampling=SamplingParams(max_new_tokens=N_TOK, position_ranges=((0, 8, 9),))
        )
    with pytest.raises(ValueError, match=r"eol token 12 .* outside the codebook \[10, 26\)"):
        CodeLayout(GRID, OFFSET, K, eol=12)
    ad = emu3_adapter(emu3)
    ids = ad.layout.to_ids(torch.zeros(1, *GRID, dtype=torch.long))
    moved = ids.clone()
    moved[0, [5, 6]] = moved[0, [6, 5]]  # EOL one place early
    with pytest.raises(ValueError, match="expected the EOL token 8 at sample 0, position 6"):
        ad.layout.to_codes(moved)
    moved = ids.clone()
    moved[0, -1] = OFFSET
    with pytest.raises(ValueError, match=r"EOF token 9 at sample 0, position 28, got 10"):
        ad.layout.to_codes(moved)
