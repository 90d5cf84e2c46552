"""ImageAdapter on tiny random-init real classes: a LlamaForCausalLM over [specials | classes |
codes] and the VQ decoders of test_vq. CFG log-probs, layouts, refusals, and the unchanged
Trainer."""

import json

import numpy as np
import pytest
import torch
from test_vq import K, tiny_emu3_vq, tiny_janus_vq, tiny_vqmodel

from grpo_ar.adapters.image import ClassCondition, ImageAdapter, TextCondition
from grpo_ar.adapters.vq import DiffusersVQ, Emu3VQ, JanusVQ
from grpo_ar.config import load_config
from grpo_ar.generation.params import SamplingParams, cfg_combine
from grpo_ar.generation.sampler import sample
from grpo_ar.io.data import load_rows
from grpo_ar.rewards import REWARDS, RewardComputer, per_sample, register_reward
from grpo_ar.train.trainer import Trainer
from grpo_ar.types import Entry, Rollout
from tiny import char_tokenizer, tiny_llama

# class-conditional vocabulary: pad 0, BOS 1, classes 2..5, null class 6, BOI 7, codes 8..23
BOS, N_CLASSES, NULL, BOI, OFFSET = 1, 4, 6, 7, 8
GRID = (4, 6)  # 8×12 pixels through a factor-2 VQ
N_TOK = GRID[0] * GRID[1]


@pytest.fixture(scope="module")
def vq():
    return DiffusersVQ(tiny_vqmodel())


@pytest.fixture(scope="module")
def lm():
    return tiny_llama(vocab_size=OFFSET + K)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def text_lm(tok):
    return tiny_llama(vocab_size=len(tok) + K, seed=1)


def params(**kw):
    return SamplingParams(max_new_tokens=N_TOK, **kw)


def class_adapter(vq, grid=GRID, **kw):
    sampling = kw.pop("sampling", params(cfg_scale=3.0))
    cond = ClassCondition(class_offset=2, num_classes=N_CLASSES, bos_token_id=BOS)
    return ImageAdapter(vq, sampling, grid, OFFSET, cond, image_prefix_ids=[BOI], **kw)


def text_adapter(vq, tok, uncond="masked", **kw):
    sampling = kw.pop("sampling", params(cfg_scale=3.0))
    cond = TextCondition(tok, "{prompt}:", uncond=uncond, negative_prompt="blurry")
    return ImageAdapter(vq, sampling, GRID, len(tok), cond, **kw)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- prompts ------------------------------------------------------------------------------------
def test_class_prompts_and_null_condition(vq):
    pb = class_adapter(vq).encode([Entry(0, ()), Entry(3, ())])
    assert pb.input_ids.tolist() == [[BOS, 2, BOI], [BOS, 5, BOI]]
    assert pb.uncond_input_ids.tolist() == [[BOS, NULL, BOI]] * 2
    assert pb.attention_mask.all() and pb.uncond_attention_mask.all()
    off = class_adapter(vq, sampling=params()).encode([Entry(1, ())])
    assert off.uncond_input_ids is None  # CFG off: no unconditional branch at all


def test_text_prompts_masked_and_negative(vq, tok):
    entries = [Entry("ab", ()), Entry("abcd", (), {"negative_prompt": "x"})]
    pb = text_adapter(vq, tok).encode(entries)
    bos, pad = tok.bos_token_id, tok.pad_token_id
    assert tok.decode(pb.input_ids[1]) == "<bos>abcd:"
    assert pb.attention_mask[0].tolist() == [0, 0, 1, 1, 1, 1]
    # masked (Janus): same length, BOS kept, every other token -> pad, still attended
    assert pb.uncond_input_ids.tolist() == [[pad, pad, bos, pad, pad, pad], [bos] + [pad] * 5]
    assert torch.equal(pb.uncond_attention_mask, pb.attention_mask)
    neg = text_adapter(vq, tok, uncond="negative").encode(entries)
    # the entry's own negative prompt wins over the adapter's default
    assert tok.decode(neg.uncond_input_ids[0], skip_special_tokens=True) == "blurry:"
    assert tok.decode(neg.uncond_input_ids[1], skip_special_tokens=True) == "x:"
    assert neg.uncond_attention_mask[1].tolist() == [0] * 5 + [1] * 3


def test_bad_prompts_and_settings_rejected(vq, tok):
    ad = class_adapter(vq)
    for bad in (4, -1, "3", True):
        with pytest.raises(ValueError, match=r"int class ids in \[0, 4\)"):
            ad.encode([Entry(bad, ())])
    with pytest.raises(ValueError, match="text-conditional prompts are strings"):
        text_adapter(vq, tok).encode([Entry(3, ())])
    empty = TextCondition(tok, uncond="negative", add_special_tokens=False)
    with pytest.raises(ValueError, match=r"\(unconditional\) prompt is empty"):
        ImageAdapter(vq, params(cfg_scale=2.0), GRID, len(tok), empty).encode([Entry("a", ())])
    with pytest.raises(ValueError, match="null_token_id=3 is a class token"):
        ClassCondition(class_offset=2, num_classes=N_CLASSES, null_token_id=3)
    with pytest.raises(
        ValueError,
        match=r"^sampling.max_new_tokens=5 conflicts with the image grid 4x6 = 24 tokens; remove it",
    ):
        class_adapter(vq, sampling=SamplingParams(max_new_tokens=5))
    # left at its default, max_new_tokens is derived from the grid, not refused
    assert class_adapter(vq, sampling=SamplingParams()).sampling.max_new_tokens == N_TOK
    with pytest.raises(ValueError, match=r"eos_token_ids=\[2\] conflicts with fixed-length image"):
        class_adapter(vq, sampling=params(eos_token_ids=(2,)))
    with pytest.raises(
        ValueError,
        match=r"allowed_ranges=\[\[0, 24\]\] conflicts with the codebook range \[8, 24\)",
    ):
        class_adapter(vq, sampling=params(allowed_ranges=((0, 24),)))
    with pytest.raises(ValueError, match="min_new_tokens=3 conflicts with fixed-length image"):
        class_adapter(vq, sampling=params(min_new_tokens=3))
    # typed spans would be sampled per span but scored under one transform: refused
    from grpo_ar.generation.params import Span

    with pytest.raises(ValueError, match=r"sampling.spans=.* conflicts with one image span"):
        class_adapter(vq, sampling=params(spans=(Span("image", length=N_TOK, temperature=0.5),)))
    with pytest.raises(ValueError, match="cfg_train='both'"):
        class_adapter(vq, cfg_train="both")
    with pytest.raises(ValueError, match="only its 4×4 grid"):
        class_adapter(JanusVQ(tiny_janus_vq()), grid=(4, 6))
    ok = class_adapter(vq)
    assert ok.sampling.allowed_ranges == ((OFFSET, OFFSET + K),)
    with pytest.raises(ValueError, match="does not fit the model's vocabulary of 20"):
        ok.sample(tiny_llama(vocab_size=20), ok.encode([Entry(0, ())]), 2)


# -- sampling and decoding ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "make,grid,size",
    [
        (lambda: DiffusersVQ(tiny_vqmodel(False)), GRID, (12, 8)),
        (lambda: DiffusersVQ(tiny_vqmodel(True)), GRID, (12, 8)),
        (lambda: JanusVQ(tiny_janus_vq()), (4, 4), (8, 8)),
        (lambda: Emu3VQ(tiny_emu3_vq()), GRID, (12, 8)),
    ],
    ids=["vqmodel", "vqmodel-lookup", "janus", "emu3"],
)
def test_sample_stays_in_codebook_and_decodes(lm, make, grid, size):
    dec = make()
    n = grid[0] * grid[1]
    ad = class_adapter(dec, grid=grid, sampling=SamplingParams(max_new_tokens=n, cfg_scale=2.0))
    r = ad.sample(lm, ad.encode([Entry(0, ()), Entry(2, ())]), 3, generator=gen())
    ids = r.completion_ids
    assert ids.shape == (6, n) and r.completion_mask.all() and not r.truncated.any()
    assert ((ids >= OFFSET) & (ids < OFFSET + K)).all()
    images = ad.decode(r)
    assert len(images) == 6 and all(im.size == size and im.mode == "RGB" for im in images)
    codes = (ids - OFFSET).reshape(6, *grid)
    unit = ad.decode_pixels(r)
    torch.testing.assert_close(unit, ((dec.decode(codes) + 1) / 2).clamp(0, 1), atol=0, rtol=0)
    sampling = ad.sampling
    u8 = torch.stack(class_adapter(dec, grid=grid, sampling=sampling, output="uint8").decode(r))
    assert u8.dtype == torch.uint8 and u8.shape == (6, size[1], size[0], 3)
    assert torch.equal(u8[4], torch.from_numpy(np.array(images[4])))
    floats = class_adapter(dec, grid=grid, sampling=sampling, output="float").decode(r)
    assert torch.equal(torch.stack(floats), unit)


def test_decode_in_chunks_equals_one_batch(vq, lm):
    ad = class_adapter(vq)
    r = ad.sample(lm, ad.encode([Entry(1, ())]), 5, generator=gen(1))
    whole = ad.decode_pixels(r)
    ad.decode_batch_size = 2
    # conv kernels sum in a batch-size-dependent order: equal up to float rounding
    torch.testing.assert_close(ad.decode_pixels(r), whole, atol=1e-5, rtol=0)


def _rollout(ad, ids):
    pb = ad.encode([Entry(0, ())] * ids.shape[0])
    n, t = ids.shape
    return Rollout(
        pb,
        1,
        ids,
        torch.ones(n, t),
        torch.zeros(n, t),
        torch.zeros(n, dtype=torch.bool),
        torch.arange(n),
        torch.arange(n),
    )


def test_wrong_grid_and_out_of_codebook_tokens_rejected(vq):
    ad = class_adapter(vq)
    good = torch.full((2, N_TOK), OFFSET + 3)
    assert len(ad.decode(_rollout(ad, good))) == 2
    with pytest.raises(ValueError, match=r"the grid \(4, 6\) needs \(N, 24\)"):
        ad.decode(_rollout(ad, good[:, :20]))
    bad = good.clone()
    bad[1, 7] = OFFSET + K  # one past the codebook: never silently clamped
    with pytest.raises(ValueError, match=r"token id 24 at sample 1, position 7 .*\[8, 24\)"):
        ad.decode(_rollout(ad, bad))
    bad[1, 7] = BOI
    with pytest.raises(ValueError, match="token id 7"):
        ad.decode(_rollout(ad, bad))


def test_prefix_sharing_with_both_cfg_branches_equals_repeated_prompts(vq, lm):
    ad = class_adapter(vq, sampling=params(cfg_scale=4.0, temperature=0.9))
    pb = ad.encode([Entry(0, ()), Entry(3, ())])
    shared = sample(lm, pb, 3, ad.sampling, generator=gen(2))
    naive = sample(lm, pb, 3, ad.sampling, generator=gen(2), share_prefix=False)
    assert torch.equal(shared.completion_ids, naive.completion_ids)
    torch.testing.assert_close(shared.sampling_logp, naive.sampling_logp, atol=1e-5, rtol=0)


# -- CFG log-probs ------------------------------------------------------------------------------
def naive_logprobs(model, ad, rollout, scale, detach_uncond=False):
    """One unpadded forward per sample and branch, `u + s·(c − u)`, codebook mask, temperature."""
    pb, p = rollout.prompts, ad.sampling
    lo, hi = ad.layout.code_range
    rows = []
    for i in range(len(rollout)):
        j = int(rollout.prompt_index[i])
        comp = rollout.completion_ids[i]

        def branch(ids, mask, j=j, comp=comp):
            full = torch.cat([ids[j][mask[j].bool()], comp])
            return model(full[None]).logits[0, -comp.shape[0] - 1 : -1]

        z = branch(pb.input_ids, pb.attention_mask)
        if scale != 1.0:
            u = branch(pb.uncond_input_ids, pb.uncond_attention_mask)
            z = cfg_combine(z, u, scale, detach_uncond)
        z = z / p.temperature
        z[:, :lo] = z[:, hi:] = float("-inf")
        if p.top_k:
            z = z.masked_fill(z < z.topk(p.top_k, -1).values[:, -1:], float("-inf"))
        rows.append(z.log_softmax(-1).gather(-1, comp[:, None])[:, 0])
    return torch.stack(rows)


CASES = {
    "class": lambda vq, tok: class_adapter(vq, sampling=params(cfg_scale=3.0, top_k=6)),
    "text-masked": lambda vq, tok: text_adapter(vq, tok, sampling=params(cfg_scale=2.5)),
    "text-negative": lambda vq, tok: text_adapter(
        vq, tok, "negative", sampling=params(cfg_scale=5.0, temperature=0.7)
    ),
    "cfg-off": lambda vq, tok: class_adapter(vq, sampling=params(temperature=1.2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_token_logprobs_equal_sampling_logp_and_naive_reference(case, vq, tok, lm, text_lm):
    ad = CASES[case](vq, tok)
    model = lm if case in ("class", "cfg-off") else text_lm
    prompts = [0, 3] if case in ("class", "cfg-off") else ["ab", "xyz12"]
    entries = [
        Entry(q, (), {"negative_prompt": "dark"} if i else {}) for i, q in enumerate(prompts)
    ]
    r = ad.sample(model, ad.encode(entries), 3, generator=gen(3))
    logp, ent = ad.token_logprobs(model, r, with_entropy=True)
    torch.testing.assert_close(logp, r.sampling_logp, atol=1e-5, rtol=0)
    assert torch.isfinite(ent).all() and (ent >= 0).all()
    with torch.no_grad():
        ref = naive_logprobs(model, ad, r, ad.sampling.cfg_scale)
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=0)
    if ad.sampling.uses_cfg:  # guidance really changed the distribution
        cond_only = naive_logprobs(model, ad, r, 1.0)
        assert (cond_only - logp).abs().max() > 0.1


@pytest.mark.parametrize("detach", [False, True])
def test_cfg_gradients_match_naive_reference(vq, lm, detach):
    ad = class_adapter(vq, detach_uncond=detach, sampling=params(cfg_scale=3.0))
    r = ad.sample(lm, ad.encode([Entry(1, ()), Entry(2, ())]), 2, generator=gen(4))
    w = torch.randn(r.completion_ids.shape, generator=gen(5))

    def grads(fn):
        lm.zero_grad()
        (fn() * w).sum().backward()
        return {k: p.grad.clone() for k, p in lm.named_parameters()}

    got = grads(lambda: ad.token_logprobs(lm, r)[0])
    want = grads(lambda: naive_logprobs(lm, ad, r, 3.0, detach))
    other = grads(lambda: naive_logprobs(lm, ad, r, 3.0, not detach))
    lm.zero_grad()
    for k in got:  # fp32: each gradient within 2e-5 of its largest entry (element-wise
        # relative checks trip on entries that are sums of cancelling terms)
        err = float((got[k] - want[k]).abs().max() / want[k].abs().max().clamp(min=1e-6))
        assert err <= 2e-5, (k, err)
    assert max((got[k] - other[k]).abs().max() for k in got) > 1e-3  # detach matters


def test_conditional_training_mode_uses_cond_only_logprobs(vq, lm):
    ad = class_adapter(vq, cfg_train="conditional", sampling=params(cfg_scale=3.0))
    assert ad.train_sampling.cfg_scale == 1.0 and ad.sampling.cfg_scale == 3.0
    r = ad.sample(lm, ad.encode([Entry(0, ()), Entry(1, ())]), 3, generator=gen(6))
    logp, _ = ad.token_logprobs(lm, r)
    with torch.no_grad():
        torch.testing.assert_close(logp, naive_logprobs(lm, ad, r, 1.0), atol=1e-5, rtol=0)
    # sampled with guidance, trained without: the documented gap importance sampling corrects
    assert (logp - r.sampling_logp).abs().max() > 0.1


def test_mismatched_cfg_rollouts_refused(vq, lm):
    a3 = class_adapter(vq, sampling=params(cfg_scale=3.0))
    r = a3.sample(lm, a3.encode([Entry(0, ()), Entry(1, ())]), 2, generator=gen(7))
    assert r.extras["cfg_scale"] == 3.0
    a2 = class_adapter(vq, sampling=params(cfg_scale=2.0))
    with pytest.raises(ValueError, match="sampled with cfg_scale=3.0 .* cfg_scale=2.0"):
        a2.token_logprobs(lm, r)
    cond_only = class_adapter(vq, cfg_train="conditional", sampling=params())
    with pytest.raises(ValueError, match="cfg_scale=3.0"):  # conditional mode still checks
        cond_only.token_logprobs(lm, r)
    with pytest.raises(ValueError, match=r"does not record the CFG scale"):
        a3.token_logprobs(lm, _rollout(a3, r.completion_ids))
    for mb in r.micro_batches(2):  # the record travels with micro-batches
        logp, _ = a3.token_logprobs(lm, mb)
        torch.testing.assert_close(logp, mb.sampling_logp, atol=1e-5, rtol=0)


# -- the unchanged Trainer ----------------------------------------------------------------------
def _brightness(output) -> float:
    return float(np.asarray(output.convert("L"), dtype=np.float64).mean() / 255.0)


if "toy_brightness" not in REWARDS:

    @register_reward("toy_brightness")
    @per_sample
    def toy_brightness(output) -> float:
        """Toy pixel reward: mean brightness of a PIL image, in [0, 1]."""
        return _brightness(output)

    @register_reward("toy_darkness")
    @per_sample
    def toy_darkness(output) -> float:
        return 1.0 - _brightness(output)


@pytest.fixture(scope="module")
def movq():
    """A VQModel whose codes differ a lot in brightness: spatial (MoVQ) norms modulated by
    N(0, 1) code vectors; uniform-code images range over ~0.45-0.69 in mean brightness."""
    model = tiny_vqmodel(norm_type="spatial")
    with torch.no_grad():
        model.quantize.embedding.weight.normal_(generator=gen(0))
    return DiffusersVQ(model)


def make_trainer(tmp_path, vq, overrides=(), cfg_train="same", reward="toy_brightness"):
    cfg = load_config(
        None,
        [
            f"sampling.max_new_tokens={N_TOK}",
            "trainer.steps=2",
            "trainer.batch_size=2",
            "trainer.lr=1e-2",
            "algorithm.group_size=4",
            f"log.run_dir={tmp_path}",
            "log.progress=false",
            *overrides,
        ],
    )
    ad = class_adapter(vq, sampling=cfg.sampling, cfg_train=cfg_train)
    entries = load_rows([{"prompt": c, "rewards": reward} for c in range(N_CLASSES)])
    model = tiny_llama(vocab_size=OFFSET + K)
    return Trainer(cfg, model, ad, entries, rewards=RewardComputer(names=[reward]))


@pytest.mark.parametrize(
    "cfg_scale,cfg_train,is_weight_is_one",
    [(1.0, "same", True), (3.0, "same", True), (3.0, "conditional", False)],
)
def test_trainer_runs_unchanged_with_the_image_adapter(
    tmp_path, vq, cfg_scale, cfg_train, is_weight_is_one
):
    tr = make_trainer(
        tmp_path,
        vq,
        [
            f"sampling.cfg_scale={cfg_scale}",
            "algorithm.grpo_iters=2",
            "trainer.grad_accum=2",
            "algorithm.beta=0.04",
            "algorithm.is_correction=token_truncate",
        ],
        cfg_train=cfg_train,
    )
    history = tr.train()
    assert len(history) == 2
    for m in history:
        assert 0.0 <= m["reward/mean"] <= 1.0 and np.isfinite(m["loss"])
        assert m["completion/length_mean"] == N_TOK
        # "same": the first pass recomputes the sampler's own distribution (weight 1);
        # "conditional": training log-probs differ from the CFG sampler's, and IS reweights
        assert (abs(m["is_weight"] - 1.0) < 1e-4) == is_weight_is_one, m["is_weight"]
    sample = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])
    assert sample["output"].endswith(".png")  # decoded images, written as files
    assert (tmp_path / sample["output"]).is_file()


@pytest.mark.parametrize("reward,sign", [("toy_brightness", 1.0), ("toy_darkness", -1.0)])
def test_grpo_with_cfg_learns_a_pixel_reward(tmp_path, movq, reward, sign):
    """10 GRPO steps under CFG move sampled images' brightness the way the reward asks."""
    tr = make_trainer(
        tmp_path,
        movq,
        [
            "sampling.cfg_scale=3.0",
            "trainer.steps=10",
            "trainer.batch_size=4",
            "algorithm.group_size=8",
            "algorithm.beta=0",
            "log.samples_per_step=0",
        ],
        reward=reward,
    )

    def brightness() -> float:
        rollout = tr.adapter.sample(
            tr.model, tr.adapter.encode(tr.train_entries), 16, generator=gen(9)
        )
        return float(np.mean([_brightness(im) for im in tr.adapter.decode(rollout)]))

    before = brightness()
    tr.train()
    after = brightness()
    # measured: 0.587 -> 0.745 (brightness), 0.587 -> 0.521 (darkness); per-image std ~0.015
    assert sign * (after - before) > 0.04, (before, after)
