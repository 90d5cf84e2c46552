"""Chameleon / Lumina-mGPT and Emu3 text-to-image adapters on tiny random-init real classes
(tests/vocab_models.py): layout tokens at their exact positions in sampled completions, only
image tokens elsewhere, teacher-forced log-probs equal to the sampler's, VQ round trips through
the families' own VQ models and vocabulary mappings, a Trainer run, and the refusals."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from vocab_models import chameleon_tokenizer, emu3_tokenizer, tiny_chameleon, tiny_emu3

from grpo_ar.adapters.chameleon import (
    ChameleonAdapter,
    ChameleonForImageGeneration,
    ChameleonVQ,
    chameleon_decoder,
    chameleon_layout,
)
from grpo_ar.adapters.codes import to_unit
from grpo_ar.adapters.emu3 import Emu3ImageAdapter
from grpo_ar.adapters.mapped_codes import MappedLayout
from grpo_ar.adapters.vq import Emu3VQ
from grpo_ar.config import load_config
from grpo_ar.generation.params import SamplingParams, position_masks
from grpo_ar.io.data import load_rows
from grpo_ar.rewards import RewardComputer
from grpo_ar.train.trainer import Trainer
from grpo_ar.types import Entry, Rollout

GRID = (4, 6)  # 8×12 pixels through the factor-2 VQ models
PROMPTS = ["a red cat", "blue sky"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def entries(prompts=PROMPTS):
    return [Entry(p, ()) for p in prompts]


def photo(h=8, w=12, n=2) -> torch.Tensor:
    """A real photograph (matplotlib's grace_hopper.jpg) at h×w, n crops, in [-1, 1]."""
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        img = Image.open(f).convert("RGB")
    crops = [
        img.crop((i * 64, 0, i * 64 + 384, 256)).resize((w, h), Image.BICUBIC) for i in range(n)
    ]
    x = torch.tensor(np.stack([np.asarray(c) for c in crops]), dtype=torch.float32)
    return x.permute(0, 3, 1, 2) / 127.5 - 1.0  # (n, 3, h, w)


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ctok():
    return chameleon_tokenizer()


@pytest.fixture(scope="module")
def cham(ctok):
    return tiny_chameleon(ctok)


@pytest.fixture(scope="module")
def cvq(cham):
    torch.manual_seed(1)
    return ChameleonVQ(cham.model.vqmodel, chameleon_decoder(cham.model.vqmodel.config))


def cham_adapter(cham, ctok, cvq, layout="chameleon", cfg=3.0, grid=GRID, **kw):
    sampling = kw.pop("sampling", SamplingParams(cfg_scale=cfg, temperature=1.5))
    return ChameleonAdapter(
        cham.config.vocabulary_map, ctok, cvq, sampling, grid, layout=layout, **kw
    )


@pytest.fixture(scope="module")
def etok():
    return emu3_tokenizer()


@pytest.fixture(scope="module")
def emu3(etok):
    return tiny_emu3(etok)


def emu3_adapter(emu3, etok, cfg=2.0, grid=GRID, **kw):
    sampling = kw.pop("sampling", SamplingParams(cfg_scale=cfg, temperature=1.5))
    return Emu3ImageAdapter(
        emu3.config.vocabulary_map, etok, Emu3VQ(emu3.model.vqmodel), sampling, grid,
        negative_prompt="ugly", **kw,
    )  # fmt: skip


def image_ids(vocab, prefix):
    return {i for name, i in vocab.items() if name.startswith(prefix)}


# -- Chameleon -----------------------------------------------------------------------------------
def chameleon_expected(vocab, layout):
    """position -> forced token of a 4×6 grid, written out by hand."""
    if layout == "chameleon":  # 24 codes, then <eoss>
        return {24: vocab["<eoss>"]}
    # <reserved08802> (4 codes = 2 patches), <reserved08803> (6 codes = 3), 4 rows of 6 codes
    # each ended by <reserved08799> (positions 8, 15, 22, 29), <eoss> at 30
    eol = vocab["<reserved08799>"]
    out = {0: vocab["<reserved08802>"], 1: vocab["<reserved08803>"], 30: vocab["<eoss>"]}
    return out | {p: eol for p in (8, 15, 22, 29)}


@pytest.mark.parametrize("layout,length", [("chameleon", 25), ("lumina_mgpt", 31)])
def test_chameleon_layout_forced_and_only_image_tokens_elsewhere(cham, ctok, cvq, layout, length):
    vocab = cham.config.vocabulary_map
    ad = cham_adapter(cham, ctok, cvq, layout)
    prompts = ad.encode(entries())
    boi = vocab["<racm3:break>"]
    assert (prompts.input_ids[:, -1] == boi).all()
    assert prompts.uncond_input_ids.tolist() == [[boi], [boi]]  # Lumina-mGPT's image-start CFG
    forced, images = chameleon_expected(vocab, layout), image_ids(vocab, "IMGIMG")
    for seed in range(3):
        r = ad.sample(cham, prompts, 4, generator=gen(seed))
        ids = r.completion_ids
        assert ids.shape == (8, length)
        for t in range(length):
            col = set(ids[:, t].tolist())
            assert col == {forced[t]} if t in forced else col <= images, (seed, t, col)
        assert len(set(ids[:, 3].tolist())) > 1  # sampled, not a constant


@pytest.mark.parametrize("layout", ["chameleon", "lumina_mgpt"])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_chameleon_teacher_forced_logprobs_equal_the_samplers(cham, ctok, cvq, layout, cfg):
    ad = cham_adapter(cham, ctok, cvq, layout, cfg=cfg)
    r = ad.sample(cham, ad.encode(entries()), 3, generator=gen(4))
    logp, _ = ad.token_logprobs(cham, r)
    assert torch.allclose(logp, r.sampling_logp, atol=1e-5, rtol=0)
    forced = list(chameleon_expected(cham.config.vocabulary_map, layout))
    assert (r.sampling_logp[:, forced] == 0).all()  # forced: probability one
    assert (r.sampling_logp[:, 2] < 0).all()  # a code position: a real choice


def test_stock_chameleon_class_masks_image_tokens_and_is_refused(cham, ctok, cvq):
    from transformers import ChameleonForConditionalGeneration

    stock = ChameleonForConditionalGeneration(cham.config).eval()
    stock.load_state_dict(cham.state_dict())
    ids = torch.tensor([[1, 20, 21, cham.config.vocabulary_map["<racm3:break>"]]])
    with torch.no_grad():
        ours, theirs = cham(input_ids=ids).logits, stock(input_ids=ids).logits
    images = sorted(image_ids(cham.config.vocabulary_map, "IMGIMG"))
    text = [i for i in range(ours.shape[-1]) if i not in images]
    assert (theirs[..., images] == torch.finfo(theirs.dtype).min).all()
    assert torch.equal(ours[..., text], theirs[..., text])  # same model otherwise
    assert ours[..., images].std() > 0
    ad = cham_adapter(cham, ctok, cvq)
    with pytest.raises(TypeError, match="ChameleonForImageGeneration.from_pretrained"):
        ad.sample(stock, ad.encode(entries()), 2)


def test_chameleon_vq_round_trip_through_its_vocabulary(cham, ctok, cvq):
    """pixels -> ChameleonVQVAE codes -> the model's own BPE ids (`get_image_tokens`) -> the
    adapter's decode equals the VQ decode of those codes, bit for bit."""
    px = photo()
    vq = cham.model.vqmodel
    codes = vq.encode(px).image_tokens.reshape(2, *GRID)
    bpe = cham.get_image_tokens(px)  # (2, 24) through transformers' img2bpe
    ad = cham_adapter(cham, ctok, cvq, cfg=1.0)
    eoi = cham.config.vocabulary_map["<eoss>"]
    completion = torch.cat([bpe.long(), torch.full((2, 1), eoi)], 1)
    assert torch.equal(ad.encode_pixels(px), completion)
    assert torch.equal(ad.layout.to_codes(completion), codes)
    assert not torch.equal(bpe - ad.layout.code_offset, codes)  # the mapping is not an offset
    with torch.no_grad():
        z = vq.quantize.embedding(codes).permute(0, 3, 1, 2)
        want = to_unit(cvq.model["decoder"](vq.post_quant_conv(z)))
    got = ad.decode_pixels(_rollout(ad, completion))
    assert torch.equal(got, want)
    assert got.shape == (2, 3, 8, 12) and got.min() >= 0.0 and got.max() <= 1.0
    lumina = cham_adapter(cham, ctok, cvq, "lumina_mgpt", cfg=1.0)
    assert torch.equal(lumina.decode_pixels(_rollout(lumina, lumina.encode_pixels(px))), want)


def _rollout(ad, ids):
    """A rollout holding `ids` as completions (decode reads only those)."""
    n, t = ids.shape
    pb = ad.encode(entries(["x"] * n))
    z = torch.zeros(n, dtype=torch.bool)
    return Rollout(
        pb, 1, ids, torch.ones(n, t), torch.zeros(n, t), z, torch.arange(n), torch.arange(n)
    )


def test_chameleon_refusals(cham, ctok, cvq):
    vocab = dict(cham.config.vocabulary_map)
    ad = cham_adapter(cham, ctok, cvq, cfg=1.0)
    ids = ad.encode_pixels(photo())
    small = cham_adapter(cham, ctok, cvq, cfg=1.0, grid=(4, 4))
    with pytest.raises(ValueError, match=r"the grid \(4, 4\) needs \(N, 17\)"):
        small.decode_pixels(_rollout(small, ids))  # a 4×6 image read as 4×4
    bad = ids.clone()
    bad[0, -1] = ids[0, 0]
    with pytest.raises(ValueError, match=r"expected layout token \d+ at sample 0, position 24"):
        ad.decode_pixels(_rollout(ad, bad))
    with pytest.raises(ValueError, match="32-pixel patches .* must be even"):
        chameleon_layout(vocab, (3, 6), "lumina_mgpt")
    with pytest.raises(ValueError, match="no end-of-image token '<eoss>'"):
        chameleon_layout({k: v for k, v in vocab.items() if k != "<eoss>"}, GRID)
    with pytest.raises(ValueError, match="no grid-size token '<reserved08806>'"):
        chameleon_layout(vocab, (12, 6), "lumina_mgpt")
    with pytest.raises(ValueError, match="not one block of consecutive ids"):
        MappedLayout.build(GRID, [10, 11, 13])
    with pytest.raises(ValueError, match=r"takes an \(h, w\) code grid, got \(4, 6, 1\)"):
        ChameleonAdapter(vocab, ctok, cvq, SamplingParams(), (4, 6, 1))
    with pytest.raises(ValueError, match="takes frames whose height and width are multiples of 2"):
        ad.encode_pixels(photo(7, 12))
    with pytest.raises(ValueError, match=r"code grid \(8, 12\) != the expected grid \(4, 6\)"):
        ad.encode_pixels(photo(16, 24))  # an image of another size than the adapter's grid


# -- Emu3 ----------------------------------------------------------------------------------------
def test_emu3_prompt_is_the_processors_t2i_prompt(emu3, etok):
    from transformers import Emu3Processor
    from transformers.models.emu3.image_processing_emu3 import Emu3ImageProcessor

    proc = Emu3Processor(Emu3ImageProcessor(), etok)
    # 32×48 pixels at the processor's factor 8 -> the 4×6 token grid
    want = proc(text=PROMPTS, return_for_image_generation=True, ratio="3:2", image_area=32 * 48)
    assert want["image_sizes"] == [list(GRID)] * 2
    ad = emu3_adapter(emu3, etok)
    got = ad.encode(entries())
    for i, row in enumerate(want["input_ids"]):
        assert got.input_ids[i][got.attention_mask[i].bool()].tolist() == row
    neg = proc(text=["ugly"], return_for_image_generation=True, ratio="3:2", image_area=32 * 48)
    assert got.uncond_input_ids[0].tolist() == neg["input_ids"][0]


def emu3_expected(vocab, eos):
    """position -> forced token of a 4×6 grid: EOL after each row of 6 (6, 13, 20, 27), EOF 28,
    <|image end|> 29, EOS 30 (transformers' T2I prefix_allowed_tokens_fn, by hand)."""
    out = {p: vocab["<|extra_200|>"] for p in (6, 13, 20, 27)}
    return out | {28: vocab["<|extra_201|>"], 29: vocab["<|image end|>"], 30: eos}


def test_emu3_layout_forced_and_only_visual_tokens_elsewhere(emu3, etok):
    vocab = emu3.config.vocabulary_map
    ad = emu3_adapter(emu3, etok)
    forced = emu3_expected(vocab, etok.eos_token_id)
    visual = image_ids(vocab, "<|visual token")
    prompts = ad.encode(entries())
    for seed in range(3):
        ids = ad.sample(emu3, prompts, 4, generator=gen(seed)).completion_ids
        assert ids.shape == (8, 31)
        for t in range(31):
            col = set(ids[:, t].tolist())
            assert col == {forced[t]} if t in forced else col <= visual, (seed, t, col)
        assert len(set(ids[:, 0].tolist())) > 1


def hf_prefix_allowed_tokens_fn(vocab, eos, h, w):
    """transformers' Emu3 docs' text-to-image `prefix_allowed_tokens_fn`, transcribed."""
    visual = tuple(sorted(image_ids(vocab, "<|visual token")))
    wrapper, eol, eof = vocab["<|image token|>"], vocab["<|extra_200|>"], vocab["<|extra_201|>"]
    eoi = vocab["<|image end|>"]

    def fn(batch_id, input_ids):
        position = torch.nonzero(input_ids == wrapper, as_tuple=True)[0][0]
        offset = input_ids.shape[0] - position
        if offset % (w + 1) == 0:
            return (eol,)
        if offset == (w + 1) * h + 1:
            return (eof,)
        if offset == (w + 1) * h + 2:
            return (eoi,)
        if offset == (w + 1) * h + 3:
            return (eos,)
        return visual

    return fn


def test_emu3_allowed_tokens_equal_transformers_prefix_allowed_tokens_fn(emu3, etok):
    """At every completion position of sampled rows, the set the adapter samples from is the
    set transformers' documented T2I constraint allows after that row's prefix."""
    ad = emu3_adapter(emu3, etok)
    vocab, prompts = emu3.config.vocabulary_map, ad.encode(entries())
    fn = hf_prefix_allowed_tokens_fn(vocab, etok.eos_token_id, *GRID)
    table, kinds = position_masks(ad.sampling, len(etok), torch.device("cpu"))
    r = ad.sample(emu3, prompts, 2, generator=gen(7))
    for i in range(r.completion_ids.shape[0]):
        p = int(r.prompt_index[i])
        prompt = prompts.input_ids[p][prompts.attention_mask[p].bool()]
        for t in range(r.completion_ids.shape[1]):
            seq = torch.cat([prompt, r.completion_ids[i, :t]])
            ours = table[kinds[t]].nonzero().squeeze(-1).tolist()
            assert ours == sorted(fn(0, seq)), (i, t)


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_emu3_teacher_forced_logprobs_equal_the_samplers(emu3, etok, cfg):
    ad = emu3_adapter(emu3, etok, cfg=cfg)
    r = ad.sample(emu3, ad.encode(entries()), 3, generator=gen(5))
    logp, _ = ad.token_logprobs(emu3, r)
    assert torch.allclose(logp, r.sampling_logp, atol=1e-5, rtol=0)
    forced = list(emu3_expected(emu3.config.vocabulary_map, etok.eos_token_id))
    assert (r.sampling_logp[:, forced] == 0).all() and (r.sampling_logp[:, 0] < 0).all()


def test_emu3_vq_round_trip_and_transformers_decode(emu3, etok):
    """pixels -> Emu3VQVAE codes -> `get_image_tokens` (rows + EOL) + EOF, EOI, EOS -> the
    adapter's decode equals `decode_image_tokens` and the VQ's own decode of the codes."""
    px = photo()
    vocab = emu3.config.vocabulary_map
    vq = emu3.model.vqmodel
    codes = torch.stack(vq.encode(px, image_sizes=[list(px.shape[-2:])] * 2).image_tokens)
    rows = emu3.model.get_image_tokens(px, torch.tensor([[8, 12]] * 2)).long().reshape(2, -1)
    tail = torch.tensor([vocab["<|extra_201|>"], vocab["<|image end|>"], etok.eos_token_id])
    completion = torch.cat([rows, tail.expand(2, 3)], 1)
    ad = emu3_adapter(emu3, etok, cfg=1.0)
    assert torch.equal(ad.encode_pixels(px), completion)
    assert torch.equal(ad.layout.to_codes(completion), codes)
    got = ad.decode_pixels(_rollout(ad, completion))
    with torch.no_grad():
        theirs = emu3.decode_image_tokens(image_tokens=completion, height=4, width=6)
    assert torch.equal(got, to_unit(theirs)) and torch.equal(got, to_unit(vq.decode(codes)))
    assert got.shape == (2, 3, 8, 12) and got.min() >= 0.0 and got.max() <= 1.0
    # and a sampled completion reads the same way through transformers
    r = ad.sample(emu3, ad.encode(entries()), 2, generator=gen(6))
    with torch.no_grad():
        theirs = emu3.decode_image_tokens(image_tokens=r.completion_ids, height=4, width=6)
    assert torch.equal(ad.decode_pixels(r), to_unit(theirs))


def test_emu3_refusals(emu3, etok):
    vocab = dict(emu3.config.vocabulary_map)
    ad = emu3_adapter(emu3, etok, cfg=1.0)
    ids = ad.encode_pixels(photo())
    other = emu3_adapter(emu3, etok, cfg=1.0, grid=(7, 3))  # 7·(3 + 1) + 3 = 31 tokens too
    with pytest.raises(ValueError, match=r"expected layout token \d+ at sample 0, position 3"):
        other.decode_pixels(_rollout(other, ids))  # a code where a 7×3 row ends
    wide = emu3_adapter(emu3, etok, cfg=1.0, grid=(6, 4))
    with pytest.raises(
        ValueError, match=r"got \(2, 31\) tokens; the grid \(6, 4\) needs \(N, 33\)"
    ):
        wide.decode_pixels(_rollout(wide, ids))
    with pytest.raises(ValueError, match="no end-of-line token '<\\|extra_200\\|>'"):
        Emu3ImageAdapter(
            {k: v for k, v in vocab.items() if k != "<|extra_200|>"}, etok,
            Emu3VQ(emu3.model.vqmodel), SamplingParams(), GRID,
        )  # fmt: skip
    with pytest.raises(Exception, match="max_new_tokens=5 conflicts with the image grid"):
        emu3_adapter(emu3, etok, sampling=SamplingParams(max_new_tokens=5))


# -- a Trainer run --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["chameleon", "emu3"])
def test_trainer_runs_grpo_steps_with_an_image_reward(tmp_path, ctok, cvq, etok, family):
    cfg = load_config(
        None,
        [
            "trainer.steps=2", "trainer.batch_size=2", "trainer.lr=1e-2",
            "algorithm.group_size=4", "algorithm.beta=0.04", "algorithm.grpo_iters=2",
            "sampling.cfg_scale=2.0", "algorithm.is_correction=token_truncate",
            f"log.run_dir={tmp_path}", "log.progress=false",
        ],
    )  # fmt: skip
    if family == "chameleon":
        model = tiny_chameleon(ctok, seed=3)
        ad = ChameleonAdapter(model.config.vocabulary_map, ctok, cvq, cfg.sampling, GRID,
                              layout="lumina_mgpt")  # fmt: skip
        assert isinstance(model, ChameleonForImageGeneration)
    else:
        model = tiny_emu3(etok, seed=3)
        ad = Emu3ImageAdapter(model.config.vocabulary_map, etok, Emu3VQ(model.model.vqmodel),
                              cfg.sampling, GRID)  # fmt: skip
    rows = load_rows([{"prompt": p, "rewards": "aesthetic_proxy"} for p in PROMPTS])
    tr = Trainer(cfg, model, ad, rows, rewards=RewardComputer(names=["aesthetic_proxy"]))
    history = tr.train()
    assert len(history) == 2
    for m in history:
        assert 0.0 <= m["reward/mean"] <= 1.0 and np.isfinite(m["loss"])
        assert m["completion/length_mean"] == ad.layout.num_tokens
        assert abs(m["is_weight"] - 1.0) < 1e-4  # trained under the sampler's own distribution
    sample = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])
    assert sample["output"].endswith(".png") and (tmp_path / sample["output"]).is_file()
    with Image.open(tmp_path / sample["output"]) as img:
        assert img.size == (12, 8)
