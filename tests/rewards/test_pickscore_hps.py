"""PickScore and HPSv2 on tiny random-init CLIPs.

HPSv2's weights are open_clip's: the mapping onto CLIPModel is checked against features the
hpsv2 package's own CLIP code computed (tests/data/make_hps_fixture.py) and against every key
and shape of the real ViT-H-14. Rewards are checked against naive per-image references.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from learned_tiny import DATA, WORDS, entries, hps_tokenizer, original, pil_images, save_clip
from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

from grpo_ar.errors import ConfigError
from grpo_ar.rewards import HPSv2, PickScore, RewardSpecError
from grpo_ar.rewards import hps as H
from grpo_ar.rewards.pixels import images_to_tensor

SIDE = 30
PROMPTS = ["a red cat", "two dog on the sea", "blue sky", "a cat over the sea"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("pick")
    save_clip(d, SIDE)
    return d


@pytest.fixture(scope="module")
def hps_dir(tmp_path_factory):
    """HPS_v2.1_compressed.pt as hpsv2 ships it ({"state_dict": ...}) and a tokenizer folder."""
    d = tmp_path_factory.mktemp("hps")
    sd, _ = original("hps_open_clip_tiny.safetensors")
    torch.save({"state_dict": sd, "epoch": 1}, d / "HPS_v2.1_compressed.pt")
    hps_tokenizer().save_pretrained(d / "tok")
    return d


def grad_probe(model):
    """Records torch.is_grad_enabled() at every forward of `model`."""
    seen = []
    model.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    return seen


# ---------------------------------------------------------------- open_clip -> CLIPModel


def test_open_clip_mapping_reproduces_hpsv2_code():
    sd, io = original("hps_open_clip_tiny.safetensors")
    model = H.load_open_clip(sd, vision_heads=2, text_heads=2, eos_token_id=39).eval()
    ids = io["in.ids"]
    with torch.no_grad():
        img = model.get_image_features(pixel_values=io["in.pixels"]).pooler_output
        txt = model.get_text_features(input_ids=ids, attention_mask=(ids > 0).long()).pooler_output
    torch.testing.assert_close(F.normalize(img, dim=-1), io["out.image"], atol=1e-5, rtol=0)
    torch.testing.assert_close(F.normalize(txt, dim=-1), io["out.text"], atol=1e-5, rtol=0)


def test_open_clip_mapping_covers_vit_h14_exactly():
    shapes = json.loads((DATA / "hps_vit_h14_keys.json").read_text())
    sd = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    config = H.open_clip_config(sd, 16, 16, eos_token_id=49407)
    v, t = config.vision_config, config.text_config
    assert (v.image_size, v.patch_size, v.hidden_size, v.num_hidden_layers) == (224, 14, 1280, 32)
    assert (t.hidden_size, t.num_hidden_layers, t.vocab_size, config.projection_dim) == (
        1024, 24, 49408, 1024,
    )  # fmt: skip
    with torch.device("meta"):
        want = {k: tuple(x.shape) for k, x in CLIPModel(config).state_dict().items()}
    got = {k: tuple(x.shape) for k, x in H.open_clip_to_clip(sd).items()}
    assert got == want  # every target filled, nothing extra, same shapes
    assert len(shapes) == 686 and len(got) == 910  # 56 in_proj pairs split into q, k, v


def test_open_clip_mapping_refuses_what_it_does_not_know():
    sd, _ = original("hps_open_clip_tiny.safetensors")
    with pytest.raises(KeyError, match="visual.attn_pool.query"):
        H.open_clip_to_clip({**sd, "visual.attn_pool.query": torch.zeros(2)})
    with pytest.raises(ValueError, match="vision_heads=3 does not divide the width 16"):
        H.load_open_clip(sd, 3, 2, 39)


# ---------------------------------------------------------------- preprocessing


def naive_resize_max_pad(img, size):
    """One (3, h, w) image: hpsv2 ResizeMaxSize by hand, into a zero canvas, then normalise."""
    h, w = img.shape[1:]
    nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
    small = F.interpolate(img[None], (nh, nw), mode="bicubic", antialias=True)[0]
    canvas = torch.zeros(3, size, size)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[:, top : top + nh, left : left + nw] = small
    mean, std = (torch.tensor(x).view(3, 1, 1) for x in (H.OPENAI_MEAN, H.OPENAI_STD))
    return (canvas - mean) / std


@pytest.mark.parametrize("size", [(20, 9), (9, 20), (40, 40), (28, 28), (50, 31)])
def test_resize_max_pad_matches_the_hand_written_transform(size):
    x = images_to_tensor(pil_images(2, size, seed=size[1]))
    got = H.ResizeMaxPad(28)(x)
    want = torch.stack([naive_resize_max_pad(i, 28) for i in x])
    assert got.shape == (2, 3, 28, 28)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    if size == (20, 9):  # 9 * 1.4 = 12.6 -> 13 columns, 15 of padding: 7 left, 8 right
        black = -torch.tensor(H.OPENAI_MEAN) / torch.tensor(H.OPENAI_STD)
        for cols in (slice(0, 7), slice(20, 28)):
            assert torch.allclose(
                got[:, :, :, cols], black.view(1, 3, 1, 1).expand_as(got[:, :, :, cols])
            )
        assert not torch.allclose(got[:, :, :, 7], black.view(1, 3, 1).expand(2, 3, 28))


def test_resize_max_pad_at_size_equals_the_clip_processor():
    """No resize at the model's size: ToTensor + OpenAI normalisation, as CLIP's processor does."""
    imgs = pil_images(3, (28, 28), seed=3)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    want = proc(images=imgs, return_tensors="pt").pixel_values
    torch.testing.assert_close(H.ResizeMaxPad(28)(images_to_tensor(imgs)), want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- hpsv2


def hps_naive(hps_dir, imgs, prompts):
    sd, _ = original("hps_open_clip_tiny.safetensors")
    model, tok = H.load_open_clip(sd, 2, 2, 39).eval(), hps_tokenizer()
    out = []
    for img, p in zip(imgs, prompts):
        px = naive_resize_max_pad(images_to_tensor([img])[0], 28)[None]
        enc = tok([p], return_tensors="pt")
        with torch.no_grad():
            i = F.normalize(model.get_image_features(pixel_values=px).pooler_output, dim=-1)
            t = F.normalize(model.get_text_features(**enc).pooler_output, dim=-1)
        out.append((i * t).sum().item())
    return torch.tensor(out)


def hps(hps_dir, **kw):
    kw = {"model": hps_dir, "tokenizer": hps_dir / "tok", "vision_heads": 2, "text_heads": 2,
          "device": "cpu", **kw}  # fmt: skip
    return HPSv2(**kw)


def test_hpsv2_equals_naive_per_image_cosine(hps_dir):
    imgs = pil_images(2, (28, 28)) + pil_images(2, (35, 20), seed=1)
    got = torch.tensor(hps(hps_dir, batch_size=3)(imgs, [{}] * 4, entries(PROMPTS, "hpsv2")))
    torch.testing.assert_close(got, hps_naive(hps_dir, imgs, PROMPTS), atol=1e-5, rtol=0)
    assert got.abs().max() <= 1 and got.std() > 1e-3  # cosines, not all alike


def test_hpsv2_batching_no_grad_bf16_and_norm(hps_dir):
    imgs = pil_images(3, (28, 28)) + pil_images(2, (30, 44), seed=2)
    prompts, ctx = PROMPTS + ["the sea"], entries(PROMPTS + ["the sea"], "hpsv2")
    one = hps(hps_dir, batch_size=1)
    seen = grad_probe(one.model.vision_model)
    with torch.enable_grad():
        single = torch.tensor(one(imgs, [{}] * 5, ctx))
    assert seen and not any(seen)
    batched = torch.tensor(hps(hps_dir, batch_size=4)(imgs, [{}] * 5, ctx))
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    half = hps(hps_dir, dtype="bfloat16", batch_size=4)
    assert next(half.model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(torch.tensor(half(imgs, [{}] * 5, ctx)), single, atol=3e-2, rtol=0)
    normed = torch.tensor(hps(hps_dir, norm_mean=0.1, norm_std=0.5)(imgs, [{}] * 5, ctx))
    torch.testing.assert_close(normed, (single - 0.1) / 0.5, atol=1e-5, rtol=0)
    assert len(prompts) == 5


def test_hpsv2_loads_safetensors_and_picks_the_version_file(hps_dir, tmp_path):
    from safetensors.torch import save_file

    sd, _ = original("hps_open_clip_tiny.safetensors")
    save_file(sd, tmp_path / "hps.safetensors")
    ctx = entries(PROMPTS[:2], "hpsv2")
    imgs = pil_images(2, (28, 28))
    a = hps(hps_dir)(imgs, [{}] * 2, ctx)
    b = hps(hps_dir, model=tmp_path / "hps.safetensors")(imgs, [{}] * 2, ctx)
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=0, rtol=0)
    with pytest.raises(
        ConfigError, match=r"folder without HPS_v2_compressed.pt.*reward_setup.hpsv2.model"
    ):
        hps(hps_dir, version="v2.0")


# ---------------------------------------------------------------- pickscore


def test_pickscore_equals_naive_logit_scaled_cosine(clip_dir):
    imgs = pil_images(4, (SIDE, SIDE))
    reward = PickScore(model=clip_dir, processor=clip_dir, device="cpu", batch_size=3)
    got = torch.tensor(reward(imgs, [{}] * 4, entries(PROMPTS, "pickscore")))
    model, tok = CLIPModel.from_pretrained(clip_dir).eval(), CLIPTokenizer.from_pretrained(clip_dir)
    proc = CLIPImageProcessorPil.from_pretrained(clip_dir)
    want = []
    for img, p in zip(imgs, PROMPTS):  # the model card's recipe, one image at a time
        with torch.no_grad():
            i = model.get_image_features(**proc(images=[img], return_tensors="pt")).pooler_output
            t = model.get_text_features(**tok([p], return_tensors="pt")).pooler_output
        i, t = i / i.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
        want.append((model.logit_scale.exp() * (t @ i.T))[0, 0].item())
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-5, rtol=0)
    assert torch.tensor(want).std() > 1e-2


def test_pickscore_batching_no_grad_bf16_and_text_arg(clip_dir):
    imgs = pil_images(3, (SIDE, SIDE)) + pil_images(2, (41, 33), seed=4)
    ctx = entries(PROMPTS + [[{"role": "user", "content": "blue sea"}]], "pickscore")
    args = [{}] * 4 + [{"text": "a dog"}]
    one = PickScore(model=clip_dir, processor=clip_dir, device="cpu", batch_size=1)
    seen = grad_probe(one.model.vision_model)
    with torch.enable_grad():
        single = torch.tensor(one(imgs, args, ctx))
    assert seen and not any(seen)
    batched = PickScore(model=clip_dir, processor=clip_dir, device="cpu", batch_size=4)
    torch.testing.assert_close(torch.tensor(batched(imgs, args, ctx)), single, atol=1e-5, rtol=0)
    by_text = one(imgs[4:], [{}], entries(["a dog"], "pickscore"))
    assert by_text[0] == pytest.approx(single[4].item(), abs=1e-6)  # the arg replaced the prompt
    half = PickScore(model=clip_dir, processor=clip_dir, device="cpu", dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16
    torch.testing.assert_close(torch.tensor(half(imgs, args, ctx)), single, atol=0.15, rtol=0)
    assert set(WORDS) >= {"cat", "dog"}


def test_pickscore_without_text_scores_none(clip_dir):
    reward = PickScore(model=clip_dir, processor=clip_dir, device="cpu")
    assert reward(pil_images(1, (SIDE, SIDE)), [{}], entries([{"image": 1}], "pickscore")) == [None]
    with pytest.raises(RewardSpecError, match=r"data.reward_setup.pickscore.processor"):
        PickScore(model=clip_dir, processor=clip_dir / "missing", device="cpu")
