"""Emu3 text-to-image (`Emu3ForConditionalGeneration`): visual tokens in the text vocabulary,
the checkpoint's own `Emu3VQVAE` as tokenizer.

- Vocabulary: code i is `<|visual token {i:06d}|>` (transformers' `Emu3ImageVocabularyMapping`,
  from `config.vocabulary_map`).
- Prompt (`Emu3Processor(..., return_for_image_generation=True)`): BOS, the text, then the image
  prefix `<|image start|>` "h*w" `<|image token|>`, h and w in codes (the processor's size
  tokens are digits and `*`). The unconditional CFG prompt has the same form around the
  negative prompt (Emu3's own generation script builds both branches this way; transformers'
  docs pass the bare negative text).
- Completion: h rows of w visual tokens each ended by `<|extra_200|>` (EOL), then
  `<|extra_201|>` (EOF), `<|image end|>` and EOS: what transformers' T2I
  `prefix_allowed_tokens_fn` allows position by position, so
  `model.decode_image_tokens(completion, height=h, width=w)` reads it as it is. Layout tokens
  are forced (`SamplingParams.position_ranges`, log-prob 0); visual positions sample only visual
  tokens.
- CFG: Emu3 guides in log-prob space, `u' + s·(c' − u')`: the same distribution as the logits
  form used here (the log-softmax constants cancel).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from grpo_ar.generation.params import SamplingParams

from .code_grid import TextCondition
from .image import ImageAdapter
from .mapped_codes import MappedLayout, codes_in_order, token_id
from .vq import Emu3VQ, VQDecoder

BOI, IMAGE_WRAPPER, EOI = "<|image start|>", "<|image token|>", "<|image end|>"
EOL, EOF = "<|extra_200|>", "<|extra_201|>"


def visual_code_ids(vocabulary_map: Mapping[str, int]) -> list[int]:
    """LM token id of each VQ code, by code index (transformers' `img2bpe`)."""
    from transformers.models.emu3.modeling_emu3 import Emu3ImageVocabularyMapping

    img2bpe = Emu3ImageVocabularyMapping(dict(vocabulary_map)).img2bpe
    return codes_in_order(img2bpe, "visual tokens")


def emu3_layout(vocabulary_map: Mapping[str, int], grid: Sequence[int], eos: int) -> MappedLayout:
    """Rows of visual tokens + EOL, then EOF, end-of-image and `eos` (module docstring)."""
    vocab = vocabulary_map
    return MappedLayout.build(
        grid,
        visual_code_ids(vocab),
        eol=token_id(vocab, EOL, "end-of-line"),
        eof=token_id(vocab, EOF, "end-of-frame"),
        tail=[token_id(vocab, EOI, "end-of-image"), eos],
    )


def image_prefix(tokenizer: Any, grid: Sequence[int]) -> list[int]:
    """The T2I image prefix `<|image start|>h*w<|image token|>` as token ids."""
    h, w = grid
    ids = list(tokenizer(f"{BOI}{h}*{w}{IMAGE_WRAPPER}", add_special_tokens=False)["input_ids"])
    for name, tok in ((BOI, ids[0]), (IMAGE_WRAPPER, ids[-1])):
        if tokenizer.convert_ids_to_tokens(tok) != name:
            raise ValueError(
                f"the tokenizer does not keep {name!r} as one token; load Emu3's tokenizer "
                "(its special tokens name the image layout)"
            )
    return ids


class Emu3ImageAdapter(ImageAdapter):
    """Text-to-image with `Emu3ForConditionalGeneration` and its own `Emu3VQVAE`.

    `vocabulary_map`: the model config's; `tokenizer`: the checkpoint's (its BOS and EOS are
    used); `decoder`: `Emu3VQ(model.model.vqmodel)`; `uncond`: "negative" (the negative prompt in
    the T2I format) or "masked". Outputs as `ImageAdapter`.
    """

    def __init__(
        self,
        vocabulary_map: Mapping[str, int],
        tokenizer: Any,
        decoder: VQDecoder,
        sampling: SamplingParams,
        grid: Sequence[int],
        prompt_template: str = "{prompt}",
        uncond: Literal["negative", "masked"] = "negative",
        negative_prompt: str = "",
        cfg_train: Literal["same", "conditional"] = "same",
        detach_uncond: bool = False,
        output: Literal["pil", "uint8", "float"] = "pil",
        decode_batch_size: int = 0,
    ) -> None:
        if len(grid) != 2:
            raise ValueError(f"Emu3ImageAdapter takes an (h, w) code grid, got {tuple(grid)}")
        if tokenizer.bos_token is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs a BOS and an EOS token (Emu3's has both)")
        codes = emu3_layout(vocabulary_map, grid, int(tokenizer.eos_token_id))
        # the processor writes BOS into the text and tokenizes without adding specials
        template = tokenizer.bos_token + prompt_template
        cond = TextCondition(tokenizer, template, uncond, negative_prompt, add_special_tokens=False)
        super().__init__(
            decoder, sampling, grid, codes.code_offset, cond, image_prefix(tokenizer, grid),
            cfg_train, detach_uncond, output, decode_batch_size, layout=codes,
        )  # fmt: skip
        self.tokenizer = tokenizer

    def save_tokenizer(self, directory: Path) -> None:
        """The tokenizer (the VQ model is part of the exported weights)."""
        self.tokenizer.save_pretrained(directory)


def build_emu3(config: Any, section: Any, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """(Emu3ForConditionalGeneration from model.path, Emu3ImageAdapter over its own VQ)."""
    from transformers import AutoTokenizer, Emu3ForConditionalGeneration

    from .text import load_causal_lm

    m = config.model
    model: Any = load_causal_lm(
        Emu3ForConditionalGeneration, m.path, dtype, device, m.attn_implementation
    )
    adapter = Emu3ImageAdapter(
        model.config.vocabulary_map, AutoTokenizer.from_pretrained(config.model.path),
        Emu3VQ(model.model.vqmodel), config.sampling, section.grid, section.prompt_template,
        section.uncond, section.negative_prompt, section.cfg_train, section.detach_uncond,
        section.output, section.decode_batch_size,
    )  # fmt: skip
    return model, adapter
