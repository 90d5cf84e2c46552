"""Text adapter: any `AutoModelForCausalLM` + tokenizer; plain prompts or chat messages."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from grpo_ar.generation.params import SamplingParams
from grpo_ar.types import Entry, PromptBatch, Rollout

from .base import Adapter

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class TextAdapter(Adapter):
    """Prompts are strings or chat messages; outputs are decoded strings (special tokens stripped,
    cut at EOS).

    `chat_template`: None applies the tokenizer's chat template to message lists only; True to
    every prompt (a string becomes one user message); False never.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        sampling: SamplingParams,
        chat_template: bool | None = None,
        max_prompt_tokens: int | None = None,
        system_prompt: str | None = None,
    ) -> None:
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError(
                    "the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token"
                )
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        if not sampling.eos_token_ids and tokenizer.eos_token_id is not None:
            sampling = replace(sampling, eos_token_ids=(tokenizer.eos_token_id,))
        pad = tokenizer.pad_token_id
        sampling = sampling.impose({"pad_token_id": (pad, f"the tokenizer's pad token {pad}")})
        super().__init__(sampling)
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.max_prompt_tokens = max_prompt_tokens
        self.system_prompt = system_prompt

    def prompt_text(self, prompt: Any) -> str:
        """The exact text fed to the model for one prompt."""
        is_chat = isinstance(prompt, list)
        use_template = self.chat_template if self.chat_template is not None else is_chat
        if not use_template:
            if is_chat:
                raise ValueError(
                    "chat messages given but chat_template=False; set model.chat_template"
                )
            return str(prompt)
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(
                "the tokenizer has no chat template; use plain string prompts or chat_template=false"
            )
        messages = list(prompt) if is_chat else [{"role": "user", "content": str(prompt)}]
        if self.system_prompt and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return str(text)  # tokenize=False: the rendered string

    def encode(self, entries: Sequence[Entry]) -> PromptBatch:
        texts = [self.prompt_text(e.prompt) for e in entries]
        templated = [isinstance(e.prompt, list) or bool(self.chat_template) for e in entries]
        # a chat template writes its own BOS; plain prompts get the tokenizer's special tokens
        rows = [
            self.tokenizer(t, add_special_tokens=not tpl)["input_ids"]
            for t, tpl in zip(texts, templated)
        ]
        if self.max_prompt_tokens is not None:
            too_long = [i for i, r in enumerate(rows) if len(r) > self.max_prompt_tokens]
            if too_long:
                raise ValueError(
                    f"prompt(s) {too_long} exceed max_prompt_tokens={self.max_prompt_tokens} "
                    f"(longest {max(len(rows[i]) for i in too_long)}); raise the limit or shorten them"
                )
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return PromptBatch(ids, mask, list(entries))

    def decode(self, rollout: Rollout) -> list[str]:
        ids, lengths = rollout.completion_ids.tolist(), rollout.lengths.tolist()
        return self.tokenizer.batch_decode(
            [row[:n] for row, n in zip(ids, lengths)], skip_special_tokens=True
        )

    def save_tokenizer(self, directory: Path) -> None:
        """The tokenizer, so the exported folder loads with `AutoTokenizer.from_pretrained`."""
        self.tokenizer.save_pretrained(directory)


def load_text_model(
    path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "",
    **kw: Any,
) -> tuple[Any, Any]:
    """(model, tokenizer) from a local folder or hub id, via the Auto classes; a non-empty
    `attn_implementation` (sdpa, flash_attention_2, ...) picks the attention kernel."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    model = load_causal_lm(AutoModelForCausalLM, path, dtype, device, attn_implementation, **kw)
    return model, tokenizer


def load_causal_lm(
    auto: Any, path: str, dtype: torch.dtype, device: str | torch.device, attn: str = "", **kw: Any
) -> torch.nn.Module:
    """`auto.from_pretrained` on `device`: a GPU model is loaded straight onto it (no full CPU
    copy first; `device_map`), a CPU one as before; `attn` picks the attention kernel."""
    extra: dict[str, Any] = {"attn_implementation": attn} if attn else {}
    if torch.device(device).type == "cuda":
        extra["device_map"] = str(device)
    # as an nn.Module: transformers' decorated `PreTrainedModel.to` does not type-check as a method
    model: torch.nn.Module = auto.from_pretrained(path, dtype=dtype, **extra, **kw)
    return model.to(device)
