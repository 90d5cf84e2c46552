"""VQ decoders behind one interface, code layouts and pixel conversions, on tiny random-init
instances of the real classes (diffusers VQModel, transformers JanusVQVAE / Emu3VQVAE)."""

import pytest
import torch

from grpo_ar.adapters.vq import (
    VQ_DECODERS,
    CodeLayout,
    DiffusersVQ,
    Emu3VQ,
    JanusVQ,
    check_codes,
    load_vq_decoder,
    strip_row_ends,
    to_pil,
    to_uint8,
    to_unit,
    with_row_ends,
)
from grpo_ar.testing import (
    VQ_CODES,
    structured_images,
    tiny_emu3_vq,
    tiny_janus_vq,
    tiny_vqmodel,
)

K = VQ_CODES  # codebook size of every tiny tokenizer here


@pytest.mark.parametrize("lookup", [False, True])
def test_diffusers_index_pixel_round_trip(lookup):
    """pixels -> flat indices -> (B, h, w) grid -> pixels equals decoding the encoder's own
    quantized latent (which never goes through the index layout): the grid order is right."""
    vq = tiny_vqmodel(lookup)
    dec = DiffusersVQ(vq)
    x = structured_images(2, 8, 12)  # non-square: an h/w mix-up cannot pass
    codes = dec.encode(x)
    assert codes.shape == (2, 4, 6) and codes.dtype == torch.long
    assert dec.pixel_size((4, 6)) == (8, 12)
    with torch.no_grad():
        z_q, _, (_, _, flat) = vq.quantize(vq.encode(x).latents)
        native = vq.decode(z_q, force_not_quantize=not lookup).sample
    assert torch.equal(codes.reshape(-1), flat)
    assert len(codes.unique()) > 3, "the test needs several distinct codes"
    pixels = dec.decode(codes)
    assert pixels.shape == (2, 3, 8, 12)
    # z_q carries the straight-through `z + (q - z).detach()`, exact only to float rounding
    torch.testing.assert_close(pixels, native, atol=1e-5, rtol=0)
    # index -> latent -> index: the quantizer maps every looked-up code vector back to itself
    every = torch.arange(K).reshape(1, 4, 4)
    z = vq.quantize.get_codebook_entry(every.reshape(-1), (1, 4, 4, 4))
    assert torch.equal(vq.quantize(z)[2][2].reshape(1, 4, 4), every)


def test_janus_index_pixel_round_trip():
    vq = tiny_janus_vq()
    dec = JanusVQ(vq)
    x = structured_images(2, 8, 8)
    codes = dec.encode(x)
    assert codes.shape == (2, 4, 4)
    with torch.no_grad():
        out = vq.encode(x)
        native = vq.decoder(vq.post_quant_conv(out.quantized_last_hidden_state))
        flat_decode = vq.decode(out.image_tokens.view(2, -1))
    assert len(codes.unique()) > 3
    pixels = dec.decode(codes)
    assert pixels.shape == (2, 3, 8, 8)
    torch.testing.assert_close(pixels, native, atol=1e-5, rtol=0)
    assert torch.equal(pixels, flat_decode)
    every = torch.arange(K).reshape(1, 16)
    z = vq.quantize.get_codebook_entry(every)
    assert torch.equal(vq.quantize(z)[2].reshape(1, 16), every)
    with pytest.raises(ValueError, match="only its 4×4 grid"):
        dec.decode(torch.zeros(1, 4, 2, dtype=torch.long))


def test_emu3_index_pixel_round_trip_images_and_clips():
    vq = tiny_emu3_vq()
    dec = Emu3VQ(vq)
    x = structured_images(2, 8, 12)
    codes = dec.encode(x)
    assert codes.shape == (2, 4, 6) and len(codes.unique()) > 3
    # an image is encoded as 4 copies of itself: a clip of 4 copies gives the same single slice
    clip = x.unsqueeze(1).repeat(1, 4, 1, 1, 1)
    assert torch.equal(dec.encode(clip), codes.unsqueeze(1))
    pixels = dec.decode(codes)
    assert pixels.shape == (2, 3, 8, 12)
    video = dec.decode(codes.unsqueeze(1))
    assert video.shape == (2, 4, 3, 8, 12)
    assert dec.pixel_size((1, 4, 6)) == (4, 8, 12)
    torch.testing.assert_close(pixels, video[:, 0], atol=1e-6, rtol=0)
    # index -> latent -> index through Emu3's own quantizer, (B, T, C, h, w) input
    every = torch.arange(K).reshape(1, 1, 4, 4)
    z = vq.quantize.embedding(every).permute(0, 1, 4, 2, 3)
    assert torch.equal(vq.quantize(z), every)
    with pytest.raises(ValueError, match="multiple of 4 frames"):
        dec.encode(clip[:, :3])


@pytest.mark.parametrize(
    "make,grid,msg",
    [
        (lambda: DiffusersVQ(tiny_vqmodel()), (1, 2, 4, 6), r"decodes \(h, w\) images"),
        (lambda: Emu3VQ(tiny_emu3_vq()), (1, 2, 1, 4, 6), r"\(t, h, w\) clips"),
    ],
)
def test_unsupported_grid_rank_rejected(make, grid, msg):
    with pytest.raises(ValueError, match=msg):
        make().decode(torch.zeros(*grid, dtype=torch.long))


def test_check_codes_rejects_out_of_codebook_and_wrong_grids():
    ok = torch.tensor([[[0, 15], [3, 4]]])
    check_codes(ok, 16, (2, 2))
    with pytest.raises(ValueError, match=r"code 16 at sample 0, position 1 is outside .*\[0, 16\)"):
        check_codes(torch.tensor([[[0, 16], [3, 4]]]), 16)
    with pytest.raises(ValueError, match="code -1"):
        check_codes(torch.tensor([[[0, 1], [3, -1]]]), 16)
    with pytest.raises(ValueError, match="integer tensor"):
        check_codes(ok.float(), 16)
    with pytest.raises(ValueError, match=r"grid \(2, 2\) != the expected grid \(4, 4\)"):
        check_codes(ok, 16, (4, 4))
    with pytest.raises(ValueError, match="outside the codebook"):  # never silently clamped
        DiffusersVQ(tiny_vqmodel()).decode(torch.full((1, 4, 6), K))


def test_code_layout_round_trip_and_errors():
    lay = CodeLayout((2, 3), code_offset=10, codebook_size=16)
    assert lay.num_tokens == 6 and lay.code_range == (10, 26)
    ids = torch.tensor([[10, 11, 12, 13, 14, 25], [25, 24, 23, 22, 21, 20]])
    codes = lay.to_codes(ids)
    assert codes.tolist()[0] == [[0, 1, 2], [3, 4, 15]]  # raster order: row after row
    assert torch.equal(lay.to_ids(codes), ids)
    with pytest.raises(ValueError, match=r"the grid \(2, 3\) needs \(N, 6\)"):
        lay.to_codes(ids[:, :5])
    bad = ids.clone()
    bad[1, 4] = 9
    with pytest.raises(ValueError, match=r"token id 9 at sample 1, position 4 .*\[10, 26\)"):
        lay.to_codes(bad)
    bad[1, 4] = 26
    with pytest.raises(ValueError, match="allowed_ranges=\\[\\[10, 26\\]\\]"):
        lay.to_codes(bad)
    with pytest.raises(ValueError, match="positive sizes"):
        CodeLayout((0, 3), 0, 4)


def test_row_ends_match_emu3_vocabulary_mapping():
    """Our EOL view of a grid equals Emu3's own `convert_img2bpe`, and strips back."""
    from transformers.models.emu3.modeling_emu3 import Emu3ImageVocabularyMapping

    offset, eol, eof = 5, 3, 4
    vocab = {f"<|visual token {i:06d}|>": offset + i for i in range(K)}
    vocab |= {"<|extra_200|>": eol, "<|extra_201|>": eof}
    mapping = Emu3ImageVocabularyMapping(vocab)
    lay = CodeLayout((3, 4), offset, K)
    codes = torch.randint(0, K, (2, 3, 4), generator=torch.Generator().manual_seed(0))
    ids = lay.to_ids(codes)
    rows = with_row_ends(ids, 4, eol)
    for i in range(2):  # Emu3 maps one image's (h, w) grid at a time
        assert torch.equal(rows[i], mapping.convert_img2bpe(codes[i]).long().reshape(-1))
        assert torch.equal(mapping.convert_bpe2img(rows[i].view(3, 5)).long(), codes[i])
    full = with_row_ends(ids, 4, eol, eof)
    assert full.shape == (2, 3 * 5 + 1) and (full[:, -1] == eof).all()
    assert torch.equal(strip_row_ends(full, 4, eol, eof), ids)
    moved = rows.clone()
    moved[0, [3, 4]] = moved[0, [4, 3]]  # EOL one place early
    with pytest.raises(ValueError, match="must end every row"):
        strip_row_ends(moved, 4, eol)
    with pytest.raises(ValueError, match="EOF"):
        strip_row_ends(rows, 4, eol, eof)


def test_pixel_conversions_hand_values():
    px = torch.tensor([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0]).reshape(1, 3, 1, 2)
    unit = to_unit(px)
    assert unit.flatten().tolist() == [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]
    u8 = to_uint8(unit)
    assert u8.shape == (1, 1, 2, 3) and u8.dtype == torch.uint8
    assert u8[0, 0].tolist() == [[0, 128, 255], [0, 191, 255]]  # (H, W, 3): channels last
    assert to_unit(torch.tensor([0.0, 255.0]), (0.0, 255.0)).tolist() == [0.0, 1.0]
    (img,) = to_pil(u8)
    assert img.size == (2, 1) and img.mode == "RGB" and img.getpixel((1, 0)) == (0, 191, 255)


@pytest.mark.parametrize(
    "kind,make,cls",
    [
        ("diffusers_vq", tiny_vqmodel, DiffusersVQ),
        ("janus_vq", tiny_janus_vq, JanusVQ),
        ("emu3_vq", tiny_emu3_vq, Emu3VQ),
    ],
)
def test_load_vq_decoder_by_name(tmp_path, kind, make, cls):
    model = make()
    model.save_pretrained(tmp_path)
    dec = load_vq_decoder(kind, str(tmp_path))
    assert isinstance(dec, cls) and dec.codebook_size == K
    codes = torch.randint(0, K, (1, 4, 4), generator=torch.Generator().manual_seed(1))
    assert torch.equal(dec.decode(codes), cls(model).decode(codes))
    assert not any(p.requires_grad for p in dec.model.parameters())


def test_unknown_decoder_kind_lists_valid_names():
    assert set(VQ_DECODERS) == {"diffusers_vq", "janus_vq", "emu3_vq", "vidtok"}
    with pytest.raises(KeyError, match="valid names: diffusers_vq, emu3_vq, janus_vq, vidtok"):
        load_vq_decoder("vqgan", "/nowhere")
