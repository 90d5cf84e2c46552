"""ImageReward on BlipVisionModel + BlipTextModel + the MLP head.

The weight mapping is checked against scores ImageReward's own BLIP code computed
(tests/data/make_imagereward_fixture.py) and against every key and shape of the real model;
the reward against a naive per-image reference built from transformers' CLIP processor.
"""

import json

import pytest
import torch
from learned_tiny import DATA, bert_tokenizer, entries, original, pil_images
from transformers import CLIPImageProcessorPil

from grpo_ar.errors import ConfigError
from grpo_ar.rewards import ImageRewardScore
from grpo_ar.rewards import imagereward as IR
from grpo_ar.rewards.pixels import images_to_tensor

PROMPTS = ["a red cat", "two dog on the sea", "blue sky", "a cat over the sea"]
SIDE = 32  # the fixture's ViT input


@pytest.fixture(scope="module")
def ir_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ir")
    sd, _ = original("imagereward_tiny.safetensors")
    torch.save(sd, d / "ImageReward.pt")
    bert_tokenizer().save_pretrained(d / "tok")
    return d


def reward(ir_dir, **kw):
    kw = {"model": ir_dir, "tokenizer": ir_dir / "tok", "vision_heads": 2, "text_heads": 2,
          "device": "cpu", **kw}  # fmt: skip
    return ImageRewardScore(**kw)


def clip_processor(side=SIDE):
    """ImageReward's _transform(side) as transformers spells it: shortest edge, centre crop,
    OpenAI mean/std (the CLIP processor's defaults)."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )


# ---------------------------------------------------------------- the weight mapping


def test_mapping_reproduces_imagereward_code():
    sd, io = original("imagereward_tiny.safetensors")
    model = IR.load_imagereward(sd, vision_heads=2, text_heads=2).eval()
    with torch.no_grad():
        image = model.vision_model(pixel_values=io["in.pixels"]).last_hidden_state
        raw = model(io["in.pixels"], io["in.ids"], io["in.mask"])
    torch.testing.assert_close(image, io["out.image_embeds"], atol=1e-5, rtol=0)
    torch.testing.assert_close(raw, io["out.raw"], atol=1e-5, rtol=0)


def test_mapping_covers_the_real_model_exactly():
    shapes = json.loads((DATA / "imagereward_keys.json").read_text())
    sd = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(512)[None]
    vision, text = IR.imagereward_configs(sd, 16, 12)
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (
        224, 16, 1024, 24,
    )  # fmt: skip
    assert (text.hidden_size, text.num_hidden_layers, text.encoder_hidden_size) == (768, 12, 1024)
    mapped, unused = IR.imagereward_to_hf(sd)
    with torch.device("meta"):
        target = IR.ImageRewardModel(vision, text, (768, 1024, 128, 64, 16, 1))
    want = {k: tuple(x.shape) for k, x in target.state_dict().items()}
    assert {k: tuple(x.shape) for k, x in mapped.items()} == want
    assert sorted(unused) == sorted(
        ["blip.text_encoder.embeddings.position_ids"]
        + [f"blip.{p}_proj.{w}" for p in ("vision", "text") for w in ("weight", "bias")]
    )
    assert len(mapped) + len(unused) == len(shapes)  # every source key accounted for


def test_mapping_refuses_unknown_keys_and_odd_positions():
    sd, _ = original("imagereward_tiny.safetensors")
    with pytest.raises(KeyError, match="blip.visual_encoder.blocks.0.ls1.gamma"):
        IR.imagereward_to_hf({**sd, "blip.visual_encoder.blocks.0.ls1.gamma": torch.zeros(16)})
    with pytest.raises(KeyError, match="itm_head.weight"):
        IR.imagereward_to_hf({**sd, "itm_head.weight": torch.zeros(2, 16)})
    shifted = {**sd, "blip.text_encoder.embeddings.position_ids": torch.arange(1, 21)[None]}
    with pytest.raises(KeyError, match="position_ids is not 0..19"):
        IR.imagereward_to_hf(shifted)


# ---------------------------------------------------------------- preprocessing


def test_preprocess_at_size_equals_the_clip_processor():
    imgs = pil_images(3, (SIDE, SIDE), seed=5)
    want = clip_processor()(images=imgs, return_tensors="pt").pixel_values
    torch.testing.assert_close(
        IR.ResizeCenterCrop(SIDE)(images_to_tensor(imgs)), want, atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("size", [(40, 50), (64, 45)])
def test_preprocess_resized_within_one_grey_level(size):
    imgs = pil_images(2, size, seed=size[0])
    want = clip_processor()(images=imgs, return_tensors="pt").pixel_values
    got = IR.ResizeCenterCrop(SIDE)(images_to_tensor(imgs))
    grey = (got - want).abs() * torch.tensor(IR.OPENAI_STD).view(1, 3, 1, 1) * 255
    assert grey.max() < 1 + 1e-3 and grey.mean() < 0.05


def test_center_crop_rounds_like_torchvision():
    """Width 35 -> 32: torchvision's offset is round(1.5) = 2, transformers' floor gives 1."""
    x = torch.rand(1, 3, SIDE, 35)
    got = IR.ResizeCenterCrop(SIDE)(x)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IR.OPENAI_MEAN, IR.OPENAI_STD))
    torch.testing.assert_close(got, (x[..., 2:34] - mean) / std, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- the reward


def naive(imgs, prompts):
    """ImageReward.score, one image at a time, on the mapped model."""
    sd, _ = original("imagereward_tiny.safetensors")
    model, tok, proc = IR.load_imagereward(sd, 2, 2).eval(), bert_tokenizer(), clip_processor()
    out = []
    for img, p in zip(imgs, prompts):
        enc = tok([p], padding="max_length", max_length=20, return_tensors="pt")
        px = proc(images=[img], return_tensors="pt").pixel_values
        with torch.no_grad():
            raw = model(px, enc["input_ids"], enc["attention_mask"])
        out.append(((raw - IR.IR_MEAN) / IR.IR_STD).item())
    return torch.tensor(out)


def test_imagereward_equals_naive_reference(ir_dir):
    imgs = pil_images(4, (SIDE, SIDE), seed=7)
    got = torch.tensor(
        reward(ir_dir, batch_size=3)(imgs, [{}] * 4, entries(PROMPTS, "imagereward"))
    )
    want = naive(imgs, PROMPTS)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert want.std() > 1e-3


def test_imagereward_batching_no_grad_bf16_and_norm(ir_dir):
    imgs = pil_images(3, (SIDE, SIDE)) + pil_images(2, (40, 50), seed=3)
    ctx = entries(PROMPTS + ["the sky"], "imagereward")
    one = reward(ir_dir, batch_size=1)
    seen = []
    one.model.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    with torch.enable_grad():
        single = torch.tensor(one(imgs, [{}] * 5, ctx))
    assert seen and not any(seen)
    batched = torch.tensor(reward(ir_dir, batch_size=4)(imgs, [{}] * 5, ctx))
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    half = reward(ir_dir, dtype="bfloat16")
    assert (
        half.model.vision_model.dtype == torch.bfloat16
        and half.model.mlp.layers[0].weight.dtype == torch.float32
    )
    torch.testing.assert_close(torch.tensor(half(imgs, [{}] * 5, ctx)), single, atol=5e-2, rtol=0)
    normed = torch.tensor(reward(ir_dir, norm_mean=-1.0, norm_std=2.0)(imgs, [{}] * 5, ctx))
    torch.testing.assert_close(normed, (single + 1.0) / 2.0, atol=1e-5, rtol=0)


def test_imagereward_setup_errors(ir_dir, tmp_path):
    (tmp_path / "ImageReward.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(
        ConfigError, match=r"not a plain tensor checkpoint.*reward_setup.imagereward.model"
    ):
        reward(ir_dir, model=tmp_path)
    sd, _ = original("imagereward_tiny.safetensors")
    torch.save({**sd, "extra.weight": torch.zeros(1)}, tmp_path / "odd.pt")
    with pytest.raises(ConfigError, match=r"not an ImageReward state dict.*extra.weight"):
        reward(ir_dir, model=tmp_path / "odd.pt")
    with pytest.raises(ConfigError, match=r"reward_setup.imagereward.tokenizer"):
        reward(ir_dir, tokenizer=tmp_path / "no" / "such")
