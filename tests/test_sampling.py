import pytest
import torch

from grpo_ar.generation.params import SamplingParams, transform_logits
from grpo_ar.generation.sampler import sample
from grpo_ar.generation.scoring import token_logprobs
from grpo_ar.types import Entry, PromptBatch
from tiny import tiny_llama


def _prompts(rows, pad=0):
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return PromptBatch(ids, mask, [Entry(str(r), ()) for r in rows])


PARAMS = [
    SamplingParams(max_new_tokens=10, temperature=0.7, top_p=0.8, eos_token_ids=(2,)),
    SamplingParams(
        max_new_tokens=10,
        temperature=1.3,
        top_k=6,
        min_p=0.05,
        eos_token_ids=(2,),
        min_new_tokens=3,
    ),
    SamplingParams(max_new_tokens=8, temperature=1.0, allowed_ranges=((10, 40),)),
]


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.mark.parametrize("params", PARAMS)
def test_teacher_forced_logprobs_equal_sampling_logp(model, params):
    prompts = _prompts([[5, 6, 7], [3, 4, 5, 6, 7, 8, 9]])
    r = sample(model, prompts, 4, params, generator=torch.Generator().manual_seed(0))
    logp, ent = token_logprobs(model, r, params, with_entropy=True)
    torch.testing.assert_close(logp, r.sampling_logp, atol=1e-4, rtol=0)
    assert torch.isfinite(ent).all() and (ent[r.completion_mask.bool()] >= 0).all()
    # logp must really come from the filtered distribution, not the plain softmax
    if params.filters_on():
        plain, _ = token_logprobs(model, r, SamplingParams(temperature=params.temperature))
        assert (plain - r.sampling_logp).abs().max() > 1e-2


@pytest.mark.parametrize("params", PARAMS)
def test_prefix_sharing_equals_repeated_prompts(model, params):
    prompts = _prompts([[5, 6, 7], [3, 4, 5, 6, 7, 8, 9]])
    shared = sample(model, prompts, 3, params, generator=torch.Generator().manual_seed(1))
    naive = sample(
        model, prompts, 3, params, generator=torch.Generator().manual_seed(1), share_prefix=False
    )
    assert torch.equal(shared.completion_ids, naive.completion_ids)
    torch.testing.assert_close(shared.sampling_logp, naive.sampling_logp, atol=1e-5, rtol=0)


def test_left_padding_does_not_change_the_distribution(model):
    params = SamplingParams(max_new_tokens=6, temperature=0.9)
    alone = _prompts([[3, 4, 5]])
    padded = _prompts([[3, 4, 5], [9, 9, 9, 9, 9, 9, 9, 9]])
    r = sample(model, alone, 2, params, generator=torch.Generator().manual_seed(2))
    # the same completions teacher-forced behind 5 pad tokens: identical per-token log-probs
    r_pad = sample(model, padded, 2, params, generator=torch.Generator().manual_seed(2))
    r_pad.completion_ids[:2] = r.completion_ids
    r_pad.completion_mask[:2] = r.completion_mask
    lp_alone, ent_alone = token_logprobs(model, r, params, with_entropy=True)
    lp_pad, ent_pad = token_logprobs(model, r_pad, params, with_entropy=True)
    torch.testing.assert_close(lp_pad[:2], lp_alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_pad[:2], ent_alone, atol=1e-5, rtol=0)


def test_left_padded_prompt_samples_like_unpadded(model):
    """Empirical: 400 first tokens of a padded prompt follow the unpadded prompt's distribution."""
    params = SamplingParams(max_new_tokens=1, temperature=1.0)
    alone = _prompts([[3, 4, 5]])
    padded = PromptBatch(
        torch.tensor([[0, 0, 0, 0, 3, 4, 5]]), torch.tensor([[0, 0, 0, 0, 1, 1, 1]]), alone.entries
    )
    a = sample(model, alone, 400, params, generator=torch.Generator().manual_seed(4))
    b = sample(model, padded, 400, params, generator=torch.Generator().manual_seed(4))
    # same probabilities up to float noise -> the same inverse-CDF draws
    assert (a.completion_ids == b.completion_ids).float().mean() > 0.99


def test_eos_masking_and_truncation(model):
    params = SamplingParams(max_new_tokens=12, eos_token_ids=(2,), temperature=1.0)
    r = sample(model, _prompts([[5, 6]]), 16, params, generator=torch.Generator().manual_seed(5))
    for ids, m, lp, trunc in zip(r.completion_ids, r.completion_mask, r.sampling_logp, r.truncated):
        n = int(m.sum())
        eos_pos = (ids == 2).nonzero()
        if trunc:
            assert eos_pos.numel() == 0 and n == ids.shape[0]
        else:
            assert int(eos_pos[0]) == n - 1  # EOS itself is trained on
            assert (ids[n:] == params.pad_token_id).all() and (lp[n:] == 0).all()
    assert not r.truncated.all(), "the test needs some completions to end"


def test_min_new_tokens_forbids_early_eos(model):
    params = SamplingParams(max_new_tokens=8, eos_token_ids=(2,), min_new_tokens=4)
    r = sample(model, _prompts([[5, 6]]), 32, params, generator=torch.Generator().manual_seed(6))
    assert (r.completion_ids[:, :4] != 2).all()


def test_allowed_ranges_respected(model):
    params = PARAMS[2]
    r = sample(model, _prompts([[5, 6]]), 16, params, generator=torch.Generator().manual_seed(7))
    assert ((r.completion_ids >= 10) & (r.completion_ids < 40)).all()


def test_greedy_is_argmax(model):
    params = SamplingParams(max_new_tokens=5, temperature=0.5)
    prompts = _prompts([[5, 6, 7]])
    r = sample(model, prompts, 2, params, greedy=True)
    assert torch.equal(r.completion_ids[0], r.completion_ids[1])
    ids = torch.cat([prompts.input_ids, r.completion_ids[:1]], 1)
    logits = model(ids).logits[0, 2:-1]
    assert torch.equal(logits.argmax(-1), r.completion_ids[0])


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    z = transform_logits(probs.log(), SamplingParams(top_p=0.8), None)
    assert torch.isfinite(z).tolist() == [[True, True, False, False]]
    z = transform_logits(probs.log(), SamplingParams(top_p=0.81), None)
    assert torch.isfinite(z).tolist() == [[True, True, True, False]]
    z = transform_logits(probs.log(), SamplingParams(min_p=0.2), None)  # keep p >= 0.1
    assert torch.isfinite(z).tolist() == [[True, True, True, False]]
    z = transform_logits(probs.log(), SamplingParams(top_k=1), None)
    assert torch.isfinite(z).tolist() == [[True, False, False, False]]


def test_cfg_logprobs_equal_sampling_logp(model):
    params = SamplingParams(max_new_tokens=6, cfg_scale=3.0, temperature=1.0, top_p=0.9)
    cond = _prompts([[5, 6, 7], [3, 4, 5, 6]])
    cond.uncond_input_ids = torch.tensor([[0, 1], [1, 1]])
    cond.uncond_attention_mask = torch.tensor([[0, 1], [1, 1]])
    r = sample(model, cond, 3, params, generator=torch.Generator().manual_seed(8))
    logp, _ = token_logprobs(model, r, params)
    torch.testing.assert_close(logp, r.sampling_logp, atol=1e-4, rtol=0)


def test_bad_params_rejected():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=0.0)


@pytest.mark.parametrize("params", PARAMS)
def test_shards_sample_what_the_whole_batch_samples(model, params):
    """One rank's prompts, marked as rows of the global batch, draw the global batch's noise:
    the shards' tokens are the one-process tokens (what torchrun data parallelism relies on)."""
    rows = [[5, 6, 7], [3, 4, 5, 6, 7, 8, 9], [9, 9], [4, 8, 15, 16]]
    whole = sample(model, _prompts(rows), 3, params, generator=torch.Generator().manual_seed(2))
    for first in (0, 2):
        part = _prompts(rows[first : first + 2])
        part.extras["shard"] = (first, 4)
        r = sample(model, part, 3, params, generator=torch.Generator().manual_seed(2))
        want = whole.completion_ids[first * 3 : (first + 2) * 3, : r.completion_ids.shape[1]]
        assert torch.equal(r.completion_ids, want)
        assert (
            whole.completion_ids[first * 3 : (first + 2) * 3, r.completion_ids.shape[1] :] == 0
        ).all()
    alone = sample(model, _prompts(rows[2:]), 3, params, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(
        alone.completion_ids, whole.completion_ids[6:, : alone.completion_ids.shape[1]]
    )


def test_shard_outside_the_batch_is_refused(model):
    part = _prompts([[5, 6, 7]])
    part.extras["shard"] = (3, 3)
    with pytest.raises(ValueError, match="outside a batch of 6"):
        sample(model, part, 2, PARAMS[0], generator=torch.Generator().manual_seed(0))


def test_draw_frequencies_match_the_distribution():
    """The inverse-CDF draw: 40,000 draws of a 6-token distribution with two zero-probability
    tokens land on each token with its probability (within 4.5 standard errors), never on a
    masked token, and return log p of the token drawn."""
    from grpo_ar.generation.sampler import Draw as _Draw

    p = torch.tensor([0.5, 0.0, 0.2, 0.25, 0.05, 0.0])
    z = p.log().expand(40_000, -1)
    tok, lp = _Draw(40_000, torch.Generator().manual_seed(0), greedy=False)(z, None)
    freq = torch.bincount(tok, minlength=6).double() / tok.numel()
    se = (p.double() * (1 - p.double()) / tok.numel()).sqrt()
    assert freq[p == 0].sum() == 0
    assert ((freq - p.double()).abs() <= 4.5 * se + 1e-12).all(), freq
    assert torch.allclose(lp, p.log()[tok])


def test_draw_never_lands_past_the_last_possible_token(monkeypatch):
    """u·mass reaching the total mass (u = 1 here; float rounding can do it for u < 1) must not
    pick the zero-probability tail after the last possible token."""
    from grpo_ar.generation.sampler import Draw as _Draw

    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(1, 1))
    z = torch.tensor([[0.0, 0.0, -float("inf"), -float("inf")]])
    tok, lp = _Draw(1, None, greedy=False)(z, None)
    assert tok.item() == 1 and torch.isclose(lp, torch.tensor(0.5).log())


# few rows end / most end (compaction) / every row ends within 3 tokens
@pytest.mark.parametrize("eos", [(2,), tuple(range(2, 12)), tuple(range(2, 40))])
def test_checking_finished_rows_every_k_tokens_samples_the_same(model, eos):
    """The accelerator setting (finished rows read every k tokens, not every token) draws the
    same tokens: each row's uniforms do not depend on which rows still run."""
    params = SamplingParams(max_new_tokens=16, temperature=1.0, eos_token_ids=eos)
    prompts = _prompts([[5, 6, 7], [3, 4, 5, 6, 7, 8, 9]])
    every_token = sample(model, prompts, 4, params, generator=torch.Generator().manual_seed(3))
    assert not every_token.truncated.all(), "the test needs some completions to end"
    if len(eos) > 10:  # every row ends: the k-token reads must trim the columns drawn after
        assert every_token.completion_ids.shape[1] == 3
    for k in (3, 8):
        gen = torch.Generator().manual_seed(3)
        lazy = sample(model, prompts, 4, params, generator=gen, check_every=k)
        assert torch.equal(lazy.completion_ids, every_token.completion_ids), k
        assert torch.equal(lazy.completion_mask, every_token.completion_mask), k
        assert torch.equal(lazy.truncated, every_token.truncated), k
        torch.testing.assert_close(lazy.sampling_logp, every_token.sampling_logp, atol=1e-5, rtol=0)
