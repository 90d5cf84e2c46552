"""`llm_judge`: a causal LM reads a filled-in template and answers with a score (greedy).

transformers is imported only when a judge is built from a path, so registering stays light.
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .base import RewardContext, register_reward


def prompt_text(prompt: Any) -> str:
    """An entry's prompt as text: strings as they are, chat messages as "role: content" lines."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and all(isinstance(m, Mapping) for m in prompt):
        return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)
    return str(prompt)


@register_reward("llm_judge")
class LLMJudge:
    """Score = first `score_pattern` group of the judge's greedy reply / `scale`; None if absent.

    `template` is a `str.format` string over `{prompt}`, `{output}` and the entry's reward args
    (which may also override `prompt` and `output`). `model` is a local path or a ready
    `(model, tokenizer)` pair. `chat=True` wraps the filled template as one user turn of the
    tokenizer's chat template.
    """

    def __init__(
        self,
        model: str | os.PathLike | tuple[Any, Any],
        template: str,
        score_pattern: str = r"(-?\d+(?:\.\d+)?)",
        max_new_tokens: int = 16,
        scale: float = 1.0,
        device: str | torch.device | None = None,
        batch_size: int = 16,
        dtype: str | None = None,
        chat: bool = False,
    ) -> None:
        if isinstance(model, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model)
            kw = (
                {}
                if dtype is None
                else {"dtype": dtype if dtype == "auto" else getattr(torch, dtype)}
            )
            self.model = AutoModelForCausalLM.from_pretrained(model, **kw)
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.model, self.tokenizer = model
        if device is not None:
            self.model.to(device)  # type: ignore[arg-type]  # transformers' decorated `to`
        self.model.eval()
        self.device = next(self.model.parameters()).device
        self.score = re.compile(score_pattern)
        if self.score.groups != 1:
            raise ValueError(
                f"score_pattern {score_pattern!r} must have exactly one group (the score)"
            )
        if scale == 0 or batch_size < 1 or max_new_tokens < 1:
            raise ValueError(
                f"need scale != 0, batch_size >= 1, max_new_tokens >= 1; got {scale}, {batch_size}, {max_new_tokens}"
            )
        self.template, self.chat = template, chat
        self.max_new_tokens, self.scale, self.batch_size = max_new_tokens, scale, batch_size
        # "{a.b}" / "{a[0]}" read argument a
        self.fields = {
            re.split(r"[.\[]", f, maxsplit=1)[0]
            for _, f, _, _ in string.Formatter().parse(template)
            if f
        }
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.last_replies: list[str] = []

    def check_args(self, args: Mapping[str, Any]) -> None:
        """Load-time check: every template field is an entry arg (or prompt/output)."""
        missing = sorted(self.fields - {"prompt", "output"} - set(args))
        if missing:
            raise ValueError(
                f"the judge template needs {', '.join(missing)}; add them to the entry's llm_judge args"
            )

    def render(self, output: Any, prompt: Any, args: Mapping[str, Any]) -> str:
        if not isinstance(output, str):
            raise TypeError(f"llm_judge reads text outputs, got {type(output).__name__}")
        text = self.template.format(**{"prompt": prompt_text(prompt), "output": output, **args})
        if self.chat:
            msgs = [{"role": "user", "content": text}]
            text = str(
                self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            )
        return text

    @torch.no_grad()
    def generate(self, texts: list[str]) -> list[str]:
        """Greedy replies, batched with left padding so every row ends where generation starts."""
        replies = []
        for b in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[b : b + self.batch_size],
                return_tensors="pt",
                padding=True,
                padding_side="left",
                add_special_tokens=not self.chat,  # the chat template already has them
            )
            ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.pad_id,
            )
            replies += self.tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        return replies

    def parse(self, reply: str) -> float | None:
        m = self.score.search(reply)
        try:
            return float(m[1]) / self.scale if m else None
        except (TypeError, ValueError):  # the group matched something that is not a number
            return None

    def __call__(
        self, outputs: list[Any], args: list[dict], ctx: RewardContext
    ) -> list[float | None]:
        texts = [self.render(o, e.prompt, a) for o, e, a in zip(outputs, ctx.entries, args)]
        self.last_replies = self.generate(texts)
        return [self.parse(r) for r in self.last_replies]
