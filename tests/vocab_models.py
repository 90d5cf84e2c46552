"""Tiny random-init Chameleon and Emu3 text-to-image models for the tests: the real transformers
classes (ChameleonForConditionalGeneration's weights under ChameleonForImageGeneration,
Emu3ForConditionalGeneration, ChameleonVQVAE, Emu3VQVAE) built offline, with a char tokenizer
whose added tokens carry the families' real token names. The image tokens are added in a
shuffled order, so code i is not `offset + i`: only the vocabulary mapping gets codes right."""

from __future__ import annotations

import random

import torch

from grpo_ar.testing import VQ_CODES, char_tokenizer, tiny_emu3_vq
from grpo_ar.train.step import disable_dropout

K = VQ_CODES


def _add(tok, names: list[str]) -> dict[str, int]:
    tok.add_tokens(names, special_tokens=True)
    return dict(tok.get_vocab())


def shuffled(names: list[str], seed: int = 0) -> list[str]:
    out = list(names)
    random.Random(seed).shuffle(out)
    return out


def chameleon_name(code: int) -> str:
    """Chameleon's BPE name of VQ code `code` (digits written as the letters A-J)."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def chameleon_tokenizer():
    """Char tokenizer + Chameleon's image tokens and Lumina-mGPT's layout tokens."""
    tok = char_tokenizer()
    layout = ["<racm3:break>", "<eoss>", "<image>", "<reserved08799>"]
    layout += [f"<reserved{8800 + n:05d}>" for n in range(1, 5)]
    _add(tok, layout + shuffled([chameleon_name(c) for c in range(K)]))
    return tok


def tiny_chameleon(tok, seed: int = 0):
    """ChameleonForImageGeneration (2 layers, hidden 32) with a VQVAE of K codes, factor 2."""
    from transformers import ChameleonConfig, ChameleonVQVAEConfig

    from grpo_ar.adapters.chameleon import ChameleonForImageGeneration

    vq = ChameleonVQVAEConfig(
        embed_dim=4, num_embeddings=K, latent_channels=4, resolution=16, base_channels=32,
        channel_multiplier=[1, 1], num_res_blocks=1, attn_resolutions=[],
    )  # fmt: skip
    cfg = ChameleonConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        vq_config=vq.to_dict(), vocabulary_map=dict(tok.get_vocab()),
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = ChameleonForImageGeneration(cfg)
    disable_dropout(model)  # as the Trainer does: training log-probs must match the sampler's
    return model


EMU3_LAYOUT = ["<|image start|>", "<|image end|>", "<|image token|>", "<|extra_200|>",
               "<|extra_201|>", "<image>"]  # fmt: skip


def emu3_tokenizer():
    """Char tokenizer (BOS <bos>, EOS <eos>; like Emu3's, it adds no BOS itself) + Emu3's layout
    and visual tokens, named as `Emu3Processor` reads them."""
    from tokenizers import processors

    tok = char_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    names = dict(image_token="<image>", boi_token="<|image start|>", eoi_token="<|image end|>",
                 image_wrapper_token="<|image token|>", eof_token="<|extra_201|>")  # fmt: skip
    for key, name in names.items():
        setattr(tok, key, name)
    _add(tok, EMU3_LAYOUT + shuffled([f"<|visual token {c:06d}|>" for c in range(K)], seed=1))
    tok.image_token_id = tok.convert_tokens_to_ids("<image>")
    return tok


def tiny_emu3(tok, seed: int = 0):
    """Emu3ForConditionalGeneration (2 layers, hidden 32) with tiny_emu3_vq's VQ (K codes)."""
    from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3TextConfig

    text = Emu3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    vq = tiny_emu3_vq(seed).config
    cfg = Emu3Config(
        vq_config=vq.to_dict(), text_config=text.to_dict(), vocabulary_map=dict(tok.get_vocab())
    )
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(cfg)
    disable_dropout(model)  # Emu3's attention_dropout is 0.1; the Trainer turns it off too
    return model
