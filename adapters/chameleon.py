"""Chameleon / Lumina-mGPT text-to-image: image codes are BPE tokens of the text vocabulary.

- Vocabulary: code i is the token named `IMGIMG<i in letters A-J>Z` (transformers'
  `ChameleonImageVocabularyMapping.img2bpe`, read from `config.vocabulary_map`).
- Sequence: prompt text, `<racm3:break>` (begin of image; in both CFG branches), then the
  completion: h·w codes and `<eoss>` (end of image) for Chameleon; for Lumina-mGPT
  (`layout="lumina_mgpt"`, its `FlexARItemProcessor`) the two grid-size tokens
  `<reserved{8800 + n:05d}>` (n = rows / columns of 32-pixel patches = codes / 2), rows of w codes
  each ended by `<reserved08799>`, then `<eoss>`. Every layout token is forced at its position
  (`SamplingParams.position_ranges`), codes are sampled among the image tokens only.
- CFG: Lumina-mGPT guides with an unconditional context that starts at the image-start token
  (`uncond="image_start"`, the default here); "negative" and "masked" are the generic choices.
- Model: `ChameleonForConditionalGeneration.forward` sets every image token's logit to the
  dtype's minimum (the released Chameleon checkpoints were not to draw images): sampled images
  would be uniform noise with constant log-probs. `ChameleonForImageGeneration` is the same
  model and weights without that mask; `ChameleonAdapter.sample` refuses the stock class.
- VQ: transformers' `ChameleonVQVAE` has the encoder and codebook but no decoder (Meta's
  VQGAN decoder is a taming-transformers `Decoder`, the architecture of diffusers' `Decoder`).
  `ChameleonVQ` decodes with the VQVAE's own codebook and `post_quant_conv` and a diffusers
  `Decoder` sized from the VQVAE's config (`chameleon_decoder`), weights loaded from a file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from einops import rearrange
from torch import Tensor, nn
from transformers import ChameleonForConditionalGeneration
from transformers.modeling_outputs import CausalLMOutputWithPast

from grpo_ar.generation.params import SamplingParams
from grpo_ar.types import PromptBatch, Rollout

from .code_grid import TextCondition
from .image import ImageAdapter
from .mapped_codes import ImageStartCondition, MappedLayout, codes_in_order, token_id
from .vq import VQDecoder

BOI, EOI = "<racm3:break>", "<eoss>"
LUMINA_EOL = "<reserved08799>"
LUMINA_PATCH = 2  # codes per side of Lumina-mGPT's 32-pixel grid unit (16 pixels per code)


def lumina_size_token(n: int) -> str:
    """Lumina-mGPT's token for a side of `n` 32-pixel patches (`get_n_grids_token`)."""
    return f"<reserved{8800 + n:05d}>"


class ChameleonForImageGeneration(ChameleonForConditionalGeneration):
    """`ChameleonForConditionalGeneration` whose logits keep the image tokens (the stock
    forward masks them to the dtype's minimum); same modules, weights and checkpoints."""

    def forward(  # type: ignore[override]
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: Any = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        labels: Tensor | None = None,
        logits_to_keep: int | Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """The stock forward without the image-token mask (loss from `labels` as the stock's)."""
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )  # fmt: skip
        hidden = out[0]  # (B, T, D)
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)  # type: ignore[call-arg]


def image_code_ids(vocabulary_map: Mapping[str, int]) -> list[int]:
    """LM token id of each VQ code, by code index (transformers' `img2bpe`)."""
    from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

    img2bpe = ChameleonImageVocabularyMapping(dict(vocabulary_map)).img2bpe
    return codes_in_order(img2bpe, "IMGIMG…Z tokens")


# -- the VQGAN -----------------------------------------------------------------------------------
def chameleon_decoder(vq_config: Any) -> nn.Module:
    """A diffusers `Decoder` mirroring the encoder of a `ChameleonVQVAEConfig` (taming-
    transformers' VQGAN decoder: mid block with attention, num_res_blocks + 1 resnets and a
    nearest-neighbour upsampling per level), random-init."""
    from diffusers.models.autoencoders.vae import Decoder

    if vq_config.attn_resolutions:
        raise ValueError(
            f"attn_resolutions={vq_config.attn_resolutions}: only decoders without attention "
            "in the up blocks are built here (Chameleon's VQGAN has none)"
        )
    levels = len(vq_config.channel_multiplier)
    return Decoder(
        in_channels=vq_config.latent_channels,
        out_channels=vq_config.in_channels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(vq_config.base_channels * m for m in vq_config.channel_multiplier),
        layers_per_block=vq_config.num_res_blocks,
        norm_num_groups=32,
        act_fn="silu",
    )


def load_chameleon_decoder(path: str | Path, vq_config: Any) -> nn.Module:
    """`chameleon_decoder(vq_config)` with weights from a .safetensors file (or a folder holding
    decoder.safetensors) in diffusers `Decoder` names; every weight must match."""
    from safetensors.torch import load_file

    p = Path(path)
    p = p / "decoder.safetensors" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"no Chameleon VQGAN decoder weights at {p}")
    decoder = chameleon_decoder(vq_config)
    decoder.load_state_dict(load_file(str(p)))
    return decoder


_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def taming_decoder_key(key: str, levels: int) -> str:
    """A taming-transformers VQGAN decoder weight name (`decoder.` prefix dropped) -> its
    diffusers `Decoder` name. taming numbers up-levels from the finest (`up.0`, no upsampler),
    diffusers up-blocks from the coarsest."""
    parts = key.split(".")
    if parts[0] == "mid":
        block, rest = parts[1], parts[2:]
        if block == "attn_1":
            return ".".join(["mid_block.attentions.0", _ATTN[rest[0]], *rest[1:]])
        return ".".join([f"mid_block.resnets.{int(block[-1]) - 1}", *rest])
    if parts[0] == "up":
        i = levels - 1 - int(parts[1])
        if parts[2] == "upsample":
            return ".".join([f"up_blocks.{i}.upsamplers.0", *parts[3:]])
        if parts[2] == "block":
            rest = ["conv_shortcut" if parts[4] == "nin_shortcut" else parts[4], *parts[5:]]
            return ".".join([f"up_blocks.{i}.resnets.{parts[3]}", *rest])
        raise ValueError(f"{key}: attention in the up blocks is not supported")
    return {"norm_out": "conv_norm_out"}.get(parts[0], parts[0]) + key[len(parts[0]) :]


def convert_taming_decoder(state_dict: Mapping[str, Tensor], vq_config: Any) -> nn.Module:
    """`chameleon_decoder(vq_config)` holding the `decoder.*` weights of a taming-transformers
    VQGAN state dict (Meta's Chameleon `vqgan.ckpt`); 1×1-conv attention weights become linear.
    Every decoder weight must be present and fit."""
    decoder = chameleon_decoder(vq_config)
    levels = len(vq_config.channel_multiplier)
    state = {}
    for key, value in state_dict.items():
        if key.startswith("decoder."):
            name = taming_decoder_key(key.removeprefix("decoder."), levels)
            state[name] = value.squeeze(-1).squeeze(-1) if ".attentions." in name else value
    decoder.load_state_dict(state)  # strict: a missing or extra weight is an error
    return decoder


def save_chameleon_decoder(decoder: nn.Module, path: str | Path) -> Path:
    """Write a `chameleon_decoder`'s weights as `path`/decoder.safetensors (what
    `load_chameleon_decoder` and [chameleon] decoder_path read); the file's path."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in decoder.state_dict().items()}
    save_file(state, str(out / "decoder.safetensors"))
    return out / "decoder.safetensors"


class ChameleonVQ(VQDecoder):
    """Chameleon's VQGAN: transformers `ChameleonVQVAE` (encoder, codebook, post_quant_conv;
    codes flat (B·h·w,) from `encode`) and a decoder (`chameleon_decoder`)."""

    def __init__(self, vq: Any, decoder: nn.Module) -> None:
        super().__init__(nn.ModuleDict({"vq": vq, "decoder": decoder}))
        cfg = vq.config
        self.codebook_size = int(cfg.num_embeddings)
        self.spatial_factor = 2 ** (len(cfg.channel_multiplier) - 1)

    def _decode(self, codes: Tensor) -> Tensor:
        vq = self.model["vq"]
        z = rearrange(vq.quantize.embedding(codes), "b h w c -> b c h w")  # (B, C, h, w)
        return self.model["decoder"](vq.post_quant_conv(z))  # (B, 3, H, W)

    def _encode(self, pixels: Tensor) -> Tensor:
        b, _, hh, ww = pixels.shape
        idx = self.model["vq"].encode(pixels).image_tokens  # (B·h·w,)
        return idx.reshape(b, hh // self.spatial_factor, ww // self.spatial_factor)


# -- the adapter ---------------------------------------------------------------------------------
def chameleon_layout(
    vocabulary_map: Mapping[str, int], grid: Sequence[int], layout: str = "chameleon"
) -> MappedLayout:
    """Where codes and layout tokens sit in the completion (module docstring)."""
    vocab, (h, w) = vocabulary_map, grid
    code_ids = image_code_ids(vocab)
    eoi = token_id(vocab, EOI, "end-of-image")
    if layout == "chameleon":
        return MappedLayout.build(grid, code_ids, tail=[eoi])
    if layout != "lumina_mgpt":
        raise ValueError(f"layout={layout!r}: use 'chameleon' or 'lumina_mgpt'")
    if h % LUMINA_PATCH or w % LUMINA_PATCH:
        raise ValueError(
            f"Lumina-mGPT sizes images in 32-pixel patches of 2×2 codes: grid {tuple(grid)} "
            "must be even on both sides"
        )
    size = [token_id(vocab, lumina_size_token(n // LUMINA_PATCH), "grid-size") for n in (h, w)]
    eol = token_id(vocab, LUMINA_EOL, "end-of-row")
    return MappedLayout.build(grid, code_ids, eol=eol, head=size, tail=[eoi])


class ChameleonAdapter(ImageAdapter):
    """Text-to-image with a Chameleon-family LM (`ChameleonForImageGeneration`) and its VQGAN.

    `vocabulary_map`: the model config's (names -> ids); `tokenizer`: the checkpoint's (text
    prompts, `template.format(prompt=...)`); `decoder`: a `ChameleonVQ` (any `VQDecoder` over
    the same codebook works); `layout`: "chameleon" or "lumina_mgpt"; `uncond`: the CFG
    unconditional prompt, "image_start" | "negative" | "masked". Outputs as `ImageAdapter`.
    """

    def __init__(
        self,
        vocabulary_map: Mapping[str, int],
        tokenizer: Any,
        decoder: VQDecoder,
        sampling: SamplingParams,
        grid: Sequence[int],
        layout: Literal["chameleon", "lumina_mgpt"] = "chameleon",
        prompt_template: str = "{prompt}",
        uncond: Literal["image_start", "negative", "masked"] = "image_start",
        negative_prompt: str = "",
        cfg_train: Literal["same", "conditional"] = "same",
        detach_uncond: bool = False,
        output: Literal["pil", "uint8", "float"] = "pil",
        decode_batch_size: int = 0,
    ) -> None:
        if len(grid) != 2:
            raise ValueError(f"ChameleonAdapter takes an (h, w) code grid, got {tuple(grid)}")
        codes = chameleon_layout(vocabulary_map, grid, layout)
        if uncond == "image_start":
            cond: TextCondition = ImageStartCondition(tokenizer, prompt_template)
        else:
            cond = TextCondition(tokenizer, prompt_template, uncond, negative_prompt)
        boi = token_id(vocabulary_map, BOI, "begin-of-image")
        super().__init__(
            decoder, sampling, grid, codes.code_offset, cond, [boi], cfg_train, detach_uncond,
            output, decode_batch_size, layout=codes,
        )  # fmt: skip
        self.layout_name, self.tokenizer = layout, tokenizer

    def save_tokenizer(self, directory: Path) -> None:
        """The tokenizer and, for a `ChameleonVQ`, its decoder (decoder.safetensors: the
        exported folder then serves as model.path and chameleon.decoder_path)."""
        self.tokenizer.save_pretrained(directory)
        if isinstance(self.decoder, ChameleonVQ):
            save_chameleon_decoder(self.decoder.model["decoder"], directory)

    def sample(
        self, model: Any, prompts: PromptBatch, group_size: int,
        generator: torch.Generator | None = None, greedy: bool = False,
    ) -> Rollout:  # fmt: skip
        """As `ImageAdapter.sample`; refuses the stock Chameleon class, whose forward masks
        the image tokens (sampling from it would ignore the model)."""
        stock = [m for m in model.modules() if type(m) is ChameleonForConditionalGeneration]
        if stock:
            raise TypeError(
                "ChameleonForConditionalGeneration.forward sets every image token's logit to "
                "the minimum, so images cannot be sampled from it; load the checkpoint with "
                "grpo_ar.adapters.chameleon.ChameleonForImageGeneration.from_pretrained"
            )
        return super().sample(model, prompts, group_size, generator=generator, greedy=greedy)


def build_chameleon(
    config: Any, section: Any, device: str, dtype: torch.dtype
) -> tuple[Any, ChameleonAdapter]:
    """(ChameleonForImageGeneration from model.path, ChameleonAdapter) of a [chameleon] run."""
    from transformers import AutoTokenizer

    from .text import load_causal_lm

    m = config.model
    model: Any = load_causal_lm(
        ChameleonForImageGeneration, m.path, dtype, device, m.attn_implementation
    )
    vq = model.model.vqmodel
    decoder = load_chameleon_decoder(section.decoder_path, vq.config).to(device, vq.dtype)
    adapter = ChameleonAdapter(
        model.config.vocabulary_map, AutoTokenizer.from_pretrained(config.model.path),
        ChameleonVQ(vq, decoder), config.sampling, section.grid, section.layout,
        section.prompt_template, section.uncond, section.negative_prompt, section.cfg_train,
        section.detach_uncond, section.output, section.decode_batch_size,
    )  # fmt: skip
    return model, adapter
