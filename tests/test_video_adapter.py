"""VideoAdapter and the video tokenizers on tiny random-init real classes: per-frame diffusers
VQModel, transformers Emu3VQVAE (3D, temporal factor 4, EOL/EOF layout) and diffusers
AutoencoderVidTok (FSQ, causal). Index <-> pixel round trips, layout tokens placed exactly,
CFG log-probs, refusals, sample logs, and the unchanged Trainer."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_forced_tokens import naive_logprobs
from test_vq import K, structured_images, tiny_emu3_vq, tiny_janus_vq, tiny_vqmodel

from grpo_ar.adapters.image import ClassCondition, ImageAdapter
from grpo_ar.adapters.video import VideoAdapter, frame_strip, save_clip, save_clips, video_grid
from grpo_ar.adapters.vq import (
    DiffusersVQ,
    Emu3VQ,
    JanusVQ,
    PerFrameVQ,
    VidTokVQ,
    load_vq_decoder,
    to_unit,
)
from grpo_ar.config import load_config
from grpo_ar.generation.params import SamplingParams
from grpo_ar.io.data import load_rows
from grpo_ar.rewards import RewardComputer
from grpo_ar.train.trainer import Trainer
from grpo_ar.types import Entry, Rollout
from tiny import tiny_llama

# pad 0, BOS 1, classes 2..5, null 6, <begin_of_video> 7, EOL 8, EOF 9, codes from 10
BOS, BOV, EOL, EOF, OFFSET = 1, 7, 8, 9, 10
K_VIDTOK = 64  # FSQ levels [8, 8]


def tiny_vidtok(seed: int = 0):
    """diffusers AutoencoderVidTok, FSQ with 64 codes, spatial 4, temporal 4, causal (~41k)."""
    from diffusers import AutoencoderVidTok

    torch.manual_seed(seed)
    return AutoencoderVidTok(
        ch=8,
        ch_mult=[1, 1, 1],
        z_channels=2,
        double_z=False,
        num_res_blocks=1,
        regularizer="fsq",
        codebook_size=K_VIDTOK,
    ).eval()


def clip_pixels(b, t, h, w, seed=0):
    """(b, t, 3, h, w) in [-1, 1]: structured frames drifting to the right over time."""
    base = structured_images(b, h, w + t, seed=seed)
    return torch.stack([base[..., i : i + w] for i in range(t)], 1)


# decoder kind -> (make, grid, frames (F, H, W))
DECODERS = {
    "per_frame_vqmodel": (lambda: PerFrameVQ(DiffusersVQ(tiny_vqmodel())), (3, 4, 4), (3, 8, 8)),
    "emu3": (lambda: Emu3VQ(tiny_emu3_vq()), (2, 4, 4), (8, 8, 8)),
    "vidtok": (lambda: VidTokVQ(tiny_vidtok()), (3, 4, 4), (9, 16, 16)),
}


@pytest.fixture(scope="module")
def decoders():
    return {k: make() for k, (make, _, _) in DECODERS.items()}


@pytest.fixture(scope="module")
def lm():
    return tiny_llama(vocab_size=OFFSET + K_VIDTOK)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def adapter(dec, grid, layout_tokens=False, **kw):
    n = int(np.prod(grid))
    if layout_tokens:
        n += grid[0] * (grid[1] + 1)
    sampling = kw.pop("sampling", SamplingParams(max_new_tokens=n, cfg_scale=3.0, top_k=12))
    cond = ClassCondition(class_offset=2, num_classes=4, bos_token_id=BOS)
    tokens = dict(eol_token_id=EOL, eof_token_id=EOF) if layout_tokens else {}
    return VideoAdapter(dec, sampling, grid, OFFSET, cond, [BOV], **tokens, **kw)


# -- tokenizers: index <-> pixel round trips ----------------------------------------------------
def test_per_frame_tokenizer_codes_each_frame_on_its_own():
    image = DiffusersVQ(tiny_vqmodel())
    dec = PerFrameVQ(image)
    x = clip_pixels(2, 3, 8, 12)
    codes = dec.encode(x)
    assert codes.shape == (2, 3, 4, 6) and len(codes.unique()) > 3
    for f in range(3):  # frame f of the clip is the image tokenizer on frame f
        assert torch.equal(codes[:, f], image.encode(x[:, f]))
    pixels = dec.decode(codes)
    assert pixels.shape == (2, 3, 3, 8, 12)
    for f in range(3):
        torch.testing.assert_close(pixels[:, f], image.decode(codes[:, f]), atol=1e-5, rtol=0)
    assert dec.grid_for((3, 8, 12)) == (3, 4, 6) and dec.pixel_size((3, 4, 6)) == (3, 8, 12)
    with pytest.raises(ValueError, match="only its 4×4 grid"):
        PerFrameVQ(JanusVQ(tiny_janus_vq())).decode(torch.zeros(1, 2, 4, 2, dtype=torch.long))


def test_emu3_clip_round_trip_through_its_own_encoder_and_decoder():
    vq = tiny_emu3_vq()
    dec = Emu3VQ(vq)
    x = clip_pixels(2, 8, 8, 12)
    codes = dec.encode(x)
    assert codes.shape == (2, 2, 4, 6) and len(codes.unique()) > 3  # 4 frames per code slice
    with torch.no_grad():
        native = torch.stack(vq.encode(x, image_sizes=[[8, 12]] * 2).image_tokens)
        assert torch.equal(codes, native)
        pixels = dec.decode(codes)
        torch.testing.assert_close(pixels, vq.decode(codes), atol=0, rtol=0)
    assert pixels.shape == (2, 8, 3, 8, 12)
    assert dec.grid_for((8, 8, 12)) == (2, 4, 6) and dec.pixel_size((2, 4, 6)) == (8, 8, 12)
    with pytest.raises(ValueError, match="multiple of 4 frames, got 6"):
        dec.encode(x[:, :6])


def test_vidtok_round_trip_matches_its_causal_padding_and_fsq_indices():
    vt = tiny_vidtok()
    dec = VidTokVQ(vt)
    assert (dec.codebook_size, dec.spatial_factor, dec.temporal_factor) == (64, 4, 4)
    x = clip_pixels(2, 9, 16, 16)
    codes = dec.encode(x)
    assert codes.shape == (2, 3, 4, 4) and len(codes.unique()) > 3  # 9 = 1 + 4·2 frames
    with torch.no_grad():
        z_q, idx = vt(x.transpose(1, 2), encoder_mode=True)  # VidTok pads frame 0 itself
        assert torch.equal(codes, idx.long())
        pixels = dec.decode(codes)
        # index -> FSQ latent -> pixels equals decoding the encoder's own quantized latent
        torch.testing.assert_close(pixels, vt.decode(z_q).transpose(1, 2), atol=1e-5, rtol=0)
        # and equals VidTok's own reconstruction of the clip
        torch.testing.assert_close(
            pixels, vt(x.transpose(1, 2)).sample.transpose(1, 2), atol=1e-5, rtol=0
        )
        # index -> latent -> index: each code's FSQ levels in the latent's channel layout
        every = torch.arange(64).reshape(1, 4, 4, 4)
        lat = vt.indices_to_latent(every)  # (1, 2, 4, 4, 4): channels = the 2 FSQ dims
        back = vt.regularization.codes_to_indices(lat.permute(0, 2, 3, 4, 1))
        assert torch.equal(back.long(), every)
        # the encoder's quantized latent is that same lookup of its indices
        torch.testing.assert_close(vt.indices_to_latent(idx.long()), z_q, atol=1e-6, rtol=0)
    assert pixels.shape == (2, 9, 3, 16, 16)
    assert dec.grid_for((9, 16, 16)) == (3, 4, 4) and dec.pixel_size((3, 4, 4)) == (9, 16, 16)
    for frames in (8, 10, 4):
        with pytest.raises(ValueError, match=r"1 \+ 4·k frames \(1, 5, 9, ...\), got"):
            dec.encode(clip_pixels(1, frames, 16, 16))


def test_video_tokenizers_refuse_what_they_cannot_take(decoders):
    from diffusers import AutoencoderVidTok

    with pytest.raises(ValueError, match="regularizer='kl' is continuous"):
        VidTokVQ(AutoencoderVidTok(ch=8, ch_mult=[1, 1, 1], num_res_blocks=1))
    with pytest.raises(ValueError, match="frames whose height and width are multiples of 4"):
        video_grid(decoders["vidtok"], 9, 16, 18)
    with pytest.raises(ValueError, match=r"1 \+ 4·k frames"):
        video_grid(decoders["vidtok"], 8, 16, 16)
    with pytest.raises(ValueError, match="multiple of 4 frames, got 7"):
        video_grid(decoders["emu3"], 7, 8, 8)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\) images or \(B, T, 3, H, W\) clips"):
        decoders["emu3"].encode(torch.zeros(1, 8, 4, 8, 8))
    with pytest.raises(ValueError, match=r"decodes \(t, h, w\) clips, got grid \(4, 4\)"):
        decoders["vidtok"].decode(torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the codebook"):  # never clamped
        decoders["vidtok"].decode(torch.full((1, 2, 4, 4), 64))


@pytest.mark.parametrize("kind", ["diffusers_vq", "vidtok"])
def test_load_video_decoder_by_name(tmp_path, kind):
    model = tiny_vqmodel() if kind == "diffusers_vq" else tiny_vidtok()
    model.save_pretrained(tmp_path)
    dec = load_vq_decoder(kind, str(tmp_path), per_frame=kind == "diffusers_vq")
    want = PerFrameVQ(DiffusersVQ(model)) if kind == "diffusers_vq" else VidTokVQ(model)
    assert type(dec) is type(want)
    codes = torch.randint(0, 16, (1, 2, 4, 4), generator=gen(1))
    torch.testing.assert_close(dec.decode(codes), want.decode(codes), atol=0, rtol=0)


# -- the adapter ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(DECODERS))
def test_sample_stays_in_codebook_and_decodes_to_frames(decoders, lm, kind):
    dec, (_, grid, (f, h, w)) = decoders[kind], DECODERS[kind]
    ad = adapter(dec, grid)
    assert video_grid(dec, f, h, w) == grid and ad.frame_size == (f, h, w)
    r = ad.sample(lm, ad.encode([Entry(0, ()), Entry(2, ())]), 3, generator=gen())
    ids, n = r.completion_ids, int(np.prod(grid))
    assert ids.shape == (6, n) and r.completion_mask.all() and not r.truncated.any()
    assert ((ids >= OFFSET) & (ids < OFFSET + dec.codebook_size)).all()
    clips = ad.decode(r)
    assert len(clips) == 6
    assert all(c.shape == (f, h, w, 3) and c.dtype == torch.uint8 for c in clips)
    unit = ad.decode_pixels(r)
    want = to_unit(dec.decode((ids - OFFSET).reshape(6, *grid)), dec.pixel_range)
    torch.testing.assert_close(unit, want, atol=0, rtol=0)
    floats = adapter(dec, grid, output="float").decode(r)
    assert torch.equal(torch.stack(floats), unit) and floats[0].shape == (f, 3, h, w)
    logp, _ = ad.token_logprobs(lm, r)
    torch.testing.assert_close(logp, r.sampling_logp, atol=1e-5, rtol=0)


def test_emu3_layout_tokens_placed_exactly_and_scored_identically(decoders, lm):
    ad = adapter(decoders["emu3"], (2, 4, 4), layout_tokens=True)
    c, e, f = -1, EOL, EOF  # one slice: 4 rows of (4 codes, EOL), then EOF
    slice_ = ([c] * 4 + [e]) * 4 + [f]
    assert ad.layout.template.tolist() == slice_ * 2
    r = ad.sample(lm, ad.encode([Entry(1, ()), Entry(3, ())]), 4, generator=gen(1))
    ids = r.completion_ids
    assert ids.shape == (8, 42)
    fixed = ad.layout.template >= 0
    assert torch.equal(ids[:, fixed], ad.layout.template[fixed].expand(8, -1))
    assert ((ids[:, ~fixed] >= OFFSET) & (ids[:, ~fixed] < OFFSET + K)).all()
    assert (r.sampling_logp[:, fixed] == 0).all() and (r.sampling_logp[:, ~fixed] < 0).all()
    logp, ent = ad.token_logprobs(lm, r, with_entropy=True)
    torch.testing.assert_close(logp, r.sampling_logp, atol=1e-5, rtol=0)
    assert (ent[:, fixed] == 0).all()
    torch.testing.assert_close(logp, naive_logprobs(lm, r, ad.sampling), atol=1e-5, rtol=0)
    codes = ad.layout.to_codes(ids)
    assert torch.equal(ad.layout.to_ids(codes), ids)
    assert ad.decode(r)[0].shape == (8, 8, 8, 3)


def test_cfg_logprobs_equal_sampler_and_naive_reference(decoders, lm):
    ad = adapter(
        decoders["vidtok"],
        (2, 4, 4),
        sampling=None
        or SamplingParams(max_new_tokens=32, cfg_scale=4.0, temperature=0.8, top_p=0.9),
    )
    r = ad.sample(lm, ad.encode([Entry(0, ()), Entry(1, ())]), 3, generator=gen(2))
    logp, _ = ad.token_logprobs(lm, r)
    torch.testing.assert_close(logp, r.sampling_logp, atol=1e-5, rtol=0)
    ref = naive_logprobs(lm, r, ad.sampling)
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=0)
    cond_only = naive_logprobs(
        lm,
        r,
        SamplingParams(
            max_new_tokens=32, temperature=0.8, top_p=0.9, allowed_ranges=ad.sampling.allowed_ranges
        ),
    )
    assert (cond_only - logp).abs().max() > 0.1  # guidance changed the distribution
    with pytest.raises(ValueError, match="sampled with cfg_scale=4.0"):
        adapter(
            decoders["vidtok"], (2, 4, 4), sampling=SamplingParams(max_new_tokens=32)
        ).token_logprobs(lm, r)


def _rollout(ad, ids):
    pb = ad.encode([Entry(0, ())] * ids.shape[0])
    n, t = ids.shape
    ones, zeros = torch.ones(n, t), torch.zeros(n, t)
    r = Rollout(
        pb, 1, ids, ones, zeros, torch.zeros(n, dtype=torch.bool), torch.arange(n), torch.arange(n)
    )
    r.extras["cfg_scale"] = ad.sampling.cfg_scale
    return r


def test_bad_grids_and_settings_rejected(decoders):
    dec = decoders["per_frame_vqmodel"]
    ad = adapter(dec, (3, 4, 4))
    good = torch.full((2, 48), OFFSET + 3)
    assert len(ad.decode(_rollout(ad, good))) == 2
    with pytest.raises(ValueError, match=r"the grid \(3, 4, 4\) needs \(N, 48\)"):
        ad.decode(_rollout(ad, good[:, :44]))
    bad = good.clone()
    bad[1, 30] = OFFSET + K
    with pytest.raises(ValueError, match=r"token id 26 at sample 1, position 30 .*\[10, 26\)"):
        ad.decode(_rollout(ad, bad))
    emu = adapter(decoders["emu3"], (2, 4, 4), layout_tokens=True)
    ids = emu.layout.to_ids(torch.zeros(1, 2, 4, 4, dtype=torch.long))
    ids[0, 20] = OFFSET  # the first slice's EOF replaced by a code
    with pytest.raises(ValueError, match="expected the EOF token 9 at sample 0, position 20"):
        emu.decode(_rollout(emu, ids))
    with pytest.raises(ValueError, match=r"VideoAdapter takes a \(t, h, w\) code grid"):
        adapter(dec, (4, 4))
    cond = ClassCondition(class_offset=2, num_classes=4)
    with pytest.raises(ValueError, match=r"ImageAdapter takes an \(h, w\) code grid"):
        ImageAdapter(decoders["emu3"], SamplingParams(max_new_tokens=32), (2, 4, 4), OFFSET, cond)
    with pytest.raises(
        ValueError,
        match=r"max_new_tokens=16 conflicts with the clip grid 3x4x4 = 48 tokens; remove it",
    ):
        adapter(dec, (3, 4, 4), sampling=SamplingParams(max_new_tokens=16))
    with pytest.raises(
        ValueError, match=r"eos_token_ids=\[2\] conflicts with fixed-length clip generation"
    ):
        adapter(dec, (3, 4, 4), sampling=SamplingParams(max_new_tokens=48, eos_token_ids=(2,)))
    with pytest.raises(ValueError, match=r"DiffusersVQ decodes \(h, w\) images"):
        adapter(DiffusersVQ(tiny_vqmodel()), (3, 4, 4))
    with pytest.raises(ValueError, match="output='pil'"):
        adapter(dec, (3, 4, 4), output="pil")


def test_encode_pixels_gives_the_lm_sequence_of_a_clip(decoders):
    ad = adapter(decoders["emu3"], (2, 4, 4), layout_tokens=True)
    ids = ad.encode_pixels(clip_pixels(2, 8, 8, 8))
    assert ids.shape == (2, 42)
    assert torch.equal(ad.layout.to_ids(ad.layout.to_codes(ids)), ids)
    with pytest.raises(ValueError, match="multiple of 4 frames"):
        ad.encode_pixels(clip_pixels(1, 5, 8, 8))


# -- sample logs ---------------------------------------------------------------------------------
def test_clips_saved_as_animated_gif_and_frame_strip(tmp_path):
    clip = torch.zeros(4, 6, 5, 3, dtype=torch.uint8)
    for i in range(4):  # four distinct frames of few colours (a GIF palette holds them exactly)
        clip[i, :, i] = torch.tensor([200, 40 * i, 10])
    gif = save_clip(clip, tmp_path / "a.gif", fps=5, scale=2)
    with Image.open(gif) as im:
        assert im.n_frames == 4 and im.size == (10, 12) and im.info["duration"] == 200
        im.seek(2)
        got = torch.from_numpy(np.array(im.convert("RGB")))[::2, ::2]
        assert torch.equal(got, clip[2])
    strip = frame_strip(clip.permute(0, 3, 1, 2).float() / 255)
    assert strip.shape == (6, 4 * 5 + 3, 3) and torch.equal(strip[:, 6:11], clip[1])
    paths = save_clips([clip, clip], tmp_path / "logs", "step3", fmt="png")
    assert [p.name for p in paths] == ["step3_000.png", "step3_001.png"]
    assert Image.open(paths[1]).size == (23, 6)
    with pytest.raises(ValueError, match="writes .gif or .png"):
        save_clip(clip, tmp_path / "a.mp4")


# -- the unchanged Trainer -----------------------------------------------------------------------
@pytest.mark.parametrize("layout_tokens", [False, True], ids=["per_frame", "emu3_eol_eof"])
def test_trainer_runs_unchanged_with_the_video_adapter(tmp_path, decoders, layout_tokens):
    kind = "emu3" if layout_tokens else "per_frame_vqmodel"
    grid = DECODERS[kind][1]
    n = int(np.prod(grid)) + (grid[0] * (grid[1] + 1) if layout_tokens else 0)
    cfg = load_config(
        None,
        [
            f"sampling.max_new_tokens={n}",
            "sampling.cfg_scale=2.0",
            "trainer.steps=3",
            "trainer.batch_size=2",
            "trainer.lr=1e-2",
            "algorithm.group_size=4",
            "algorithm.grpo_iters=2",
            "algorithm.beta=0.04",
            "algorithm.is_correction=token_truncate",
            f"log.run_dir={tmp_path}",
            "log.progress=false",
        ],
    )
    ad = adapter(decoders[kind], grid, layout_tokens, sampling=cfg.sampling)
    directions = ["left", "right", "up", "down"]
    rows = [
        {
            "prompt": c,
            "rewards": [{"name": "motion", "args": {"direction": d}}, "temporal_consistency"],
        }
        for c, d in enumerate(directions)
    ]
    model = tiny_llama(vocab_size=OFFSET + K)
    names = ["motion", "temporal_consistency"]
    history = Trainer(cfg, model, ad, load_rows(rows), rewards=RewardComputer(names=names)).train()
    assert len(history) == 3
    for m in history:
        assert np.isfinite(m["loss"]) and np.isfinite(m["reward/mean"])
        assert -1.0 <= m["reward/motion/mean"] <= 1.0 and m["reward/failed_frac"] == 0.0
        assert m["completion/length_mean"] == n
        assert abs(m["is_weight"] - 1.0) < 1e-4  # training recomputes the sampler's distribution
