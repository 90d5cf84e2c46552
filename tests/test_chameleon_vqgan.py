"""Chameleon's VQGAN decoder: `convert_taming_decoder` + diffusers `Decoder` against a naive
functional copy of taming-transformers' `Decoder.forward` (the architecture of Meta's
`vqgan.ckpt`, as in facebookresearch/chameleon `chameleon/inference/vqgan.py`), on random
weights with taming's names; and `ChameleonVQ` on a real `ChameleonVQVAE`'s codes."""

import pytest
import torch
import torch.nn.functional as F
from test_vocab_image_adapters import photo

from grpo_ar.adapters.chameleon import ChameleonVQ, convert_taming_decoder, taming_decoder_key


def vq_config():
    from transformers import ChameleonVQVAEConfig

    # three levels with a channel change: upsamplers and nin_shortcut resnets both occur
    return ChameleonVQVAEConfig(
        embed_dim=4, num_embeddings=16, latent_channels=4, resolution=16, base_channels=32,
        channel_multiplier=[1, 2, 2], num_res_blocks=1, attn_resolutions=[],
    )  # fmt: skip


def taming_state(cfg, seed=0) -> dict:
    """Random weights under taming's decoder names and shapes (plus encoder/codebook keys)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict = {}

    def conv(name, cin, cout, k):
        sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5
        sd[f"{name}.bias"] = 0.1 * torch.randn(cout, generator=g)

    def norm(name, c):
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    ch, mult = cfg.base_channels, cfg.channel_multiplier
    c = ch * mult[-1]
    conv("decoder.conv_in", cfg.latent_channels, c, 3)
    resnet("decoder.mid.block_1", c, c)
    norm("decoder.mid.attn_1.norm", c)
    for p in ("q", "k", "v", "proj_out"):
        conv(f"decoder.mid.attn_1.{p}", c, c, 1)
    resnet("decoder.mid.block_2", c, c)
    for level in reversed(range(len(mult))):
        for j in range(cfg.num_res_blocks + 1):
            resnet(f"decoder.up.{level}.block.{j}", c, ch * mult[level])
            c = ch * mult[level]
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c)
    conv("decoder.conv_out", c, 3, 3)
    conv("encoder.conv_in", 3, ch, 3)  # not the decoder's: ignored
    sd["quantize.embedding.weight"] = torch.randn(16, 4, generator=g)
    return sd


def taming_forward(sd, z, levels, res_blocks):
    """taming `Decoder.forward` (temb None, give_pre_end / tanh_out False), op for op."""

    def gn(x, n):
        return F.group_norm(x, 32, sd[f"{n}.weight"], sd[f"{n}.bias"], eps=1e-6)

    def conv(x, n, pad):
        return F.conv2d(x, sd[f"{n}.weight"], sd[f"{n}.bias"], padding=pad)

    def resnet(x, n):
        h = conv(F.silu(gn(x, f"{n}.norm1")), f"{n}.conv1", 1)
        h = conv(F.silu(gn(h, f"{n}.norm2")), f"{n}.conv2", 1)
        return (conv(x, f"{n}.nin_shortcut", 0) if f"{n}.nin_shortcut.weight" in sd else x) + h

    def attn(x, n):
        h = gn(x, f"{n}.norm")
        q, k, v = (conv(h, f"{n}.{p}", 0) for p in "qkv")
        b, c, hh, ww = q.shape
        w = torch.bmm(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1)) * c**-0.5
        h = torch.bmm(v.reshape(b, c, -1), w.softmax(2).permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + conv(h, f"{n}.proj_out", 0)

    h = conv(z, "decoder.conv_in", 1)
    h = resnet(attn(resnet(h, "decoder.mid.block_1"), "decoder.mid.attn_1"), "decoder.mid.block_2")
    for level in reversed(range(levels)):
        for j in range(res_blocks + 1):
            h = resnet(h, f"decoder.up.{level}.block.{j}")
        if level != 0:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = conv(h, f"decoder.up.{level}.upsample.conv", 1)
    return conv(F.silu(gn(h, "decoder.norm_out")), "decoder.conv_out", 1)


def test_key_names_by_hand():
    assert taming_decoder_key("up.0.block.1.nin_shortcut.weight", 3) == (
        "up_blocks.2.resnets.1.conv_shortcut.weight"
    )
    assert taming_decoder_key("up.2.upsample.conv.bias", 3) == "up_blocks.0.upsamplers.0.conv.bias"
    assert taming_decoder_key("mid.block_2.norm1.weight", 3) == "mid_block.resnets.1.norm1.weight"
    assert taming_decoder_key("mid.attn_1.proj_out.weight", 3) == (
        "mid_block.attentions.0.to_out.0.weight"
    )
    assert taming_decoder_key("norm_out.bias", 3) == "conv_norm_out.bias"
    assert taming_decoder_key("conv_in.weight", 3) == "conv_in.weight"


def test_converted_decoder_equals_the_taming_forward():
    cfg = vq_config()
    sd = taming_state(cfg)
    decoder = convert_taming_decoder(sd, cfg).eval()
    z = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = decoder(z), taming_forward(sd, z, 3, cfg.num_res_blocks)
    assert got.shape == (2, 3, 12, 20)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    missing = {k: v for k, v in sd.items() if k != "decoder.up.1.block.0.conv2.bias"}
    with pytest.raises(RuntimeError, match=r"Missing key.*up_blocks\.1\.resnets\.0\.conv2\.bias"):
        convert_taming_decoder(missing, cfg)


def test_chameleon_vq_decodes_a_real_vqvaes_codes_as_taming_would():
    """ChameleonVQVAE (encoder + codebook) codes of a photo -> ChameleonVQ.decode equals
    taming's decode(post_quant_conv(codebook[codes]))."""
    from transformers import ChameleonVQVAE

    cfg = vq_config()
    torch.manual_seed(0)
    vq = ChameleonVQVAE(cfg).eval()
    sd = taming_state(cfg, seed=2)
    dec = ChameleonVQ(vq, convert_taming_decoder(sd, cfg))
    px = photo(16, 24)
    codes = dec.encode(px)  # (2, 4, 6): spatial factor 4
    assert torch.equal(codes.reshape(-1), vq.encode(px).image_tokens)
    with torch.no_grad():
        z = vq.post_quant_conv(vq.quantize.embedding(codes).permute(0, 3, 1, 2))
        want = taming_forward(sd, z, 3, cfg.num_res_blocks)
    assert torch.allclose(dec.decode(codes), want, atol=1e-5, rtol=0)
    assert dec.pixel_size((4, 6)) == (16, 24)
