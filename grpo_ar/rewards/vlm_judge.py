"""`vlm_judge`: any transformers image-text-to-text model (`AutoModelForImageTextToText` + its
processor) looks at a generated image and the entry's prompt and gives a score.

Two ways to read the score (`mode`):
- "expected" (default): one forward pass; at the answer position, the probabilities of the
  score tokens (`scores`, each one token), renormalised over them, weight their values:
  sum_s s * p(s) / sum_s p(s). Deterministic, cheaper than decoding, and graded (UnifiedReward,
  VisionReward and Q-Align read scores this way).
- "generate": greedy decoding, the first `score_pattern` group parsed as a number, clamped to
  [min(scores), max(scores)]; a reply without one scores `default` (None: the sample counts as
  failed), logged once with the reply, never an exception.
Then score / scale, and (score - norm_mean) / norm_std like the other learned rewards.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .base import RewardContext, register_reward
from .clip import caption, check_text
from .judge import prompt_text
from .learned import ScorerSetup, check_source, from_pretrained, setup_error
from .pixels import image_to_tensor

logger = logging.getLogger("grpo_ar.rewards")

DEFAULT_TEMPLATE = (
    "Rate how well this image matches the prompt and how good it looks, from 0 (worst) to 9 "
    "(best). Prompt: {prompt}\nAnswer with one digit."
)
MODEL_WHAT = "a folder or hub id of an image-text-to-text model with its processor"


@register_reward("vlm_judge", defaults={"text": None}, check=check_text)
class VLMJudge:
    """Score an image with a VLM: expected score-token value, or a score parsed from a greedy
    reply. Setup: model (folder, hub id, or a ready (model, processor) pair), template (with
    {prompt}), mode, scores, answer_prefix, score_pattern, max_new_tokens, default, scale,
    device, dtype, batch_size, norm_mean, norm_std. Text: arg `text`, else the entry's prompt."""

    name = "vlm_judge"

    def __init__(
        self, model: str | os.PathLike | tuple[Any, Any], template: str = DEFAULT_TEMPLATE,
        mode: str = "expected", scores: tuple[str, ...] | list[str] = tuple("0123456789"),
        answer_prefix: str = "", score_pattern: str = r"(-?\d+(?:\.\d+)?)", max_new_tokens: int = 8,
        default: float | None = None, scale: float = 1.0, device: str | None = None,
        dtype: str | None = None, batch_size: int = 8, norm_mean: float = 0.0,
        norm_std: float = 1.0,
    ) -> None:  # fmt: skip
        n = self.name
        self.setup = ScorerSetup.check(n, device, dtype, batch_size, norm_mean, norm_std)
        if mode not in ("expected", "generate"):
            raise setup_error(n, "mode", mode, "is not a mode", '"expected" or "generate"')
        if "{prompt}" not in template:
            raise setup_error(n, "template", template, "has no {prompt}", "a text with {prompt}")
        try:
            values = [float(s) for s in scores]
        except (TypeError, ValueError):
            values = []
        if len(values) < 2:
            raise setup_error(
                n, "scores", scores, "are not 2+ numbers", 'strings like ["1", ..., "9"]'
            )
        pattern = re.compile(score_pattern)
        if pattern.groups != 1:
            raise setup_error(n, "score_pattern", score_pattern, "needs one group", r"e.g. (\d+)")
        if scale == 0 or max_new_tokens < 1:
            raise setup_error(
                n, "scale", scale, "or max_new_tokens is invalid", "scale != 0, max_new_tokens >= 1"
            )
        self.model, self.processor = self.load(model)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.score_ids = self.token_ids(list(scores))
        self.values = torch.tensor(values)
        self.template, self.mode, self.answer_prefix = template, mode, answer_prefix
        self.pattern, self.max_new_tokens, self.default = pattern, max_new_tokens, default
        self.scale = float(scale)
        self.last_replies: list[str] = []  # the replies of the last call (mode "generate")
        self._warned = False

    def load(self, model: str | os.PathLike | tuple[Any, Any]) -> tuple[Any, Any]:
        """(model in eval mode, frozen, in the setup dtype/device; its processor)."""
        if isinstance(model, tuple):
            net, proc = model
        else:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            src = check_source(self.name, "model", model, MODEL_WHAT)
            proc = from_pretrained(
                self.name, "model", src, MODEL_WHAT, AutoProcessor.from_pretrained
            )
            net = from_pretrained(
                self.name, "model", src, MODEL_WHAT, AutoModelForImageTextToText.from_pretrained
            )
        if getattr(proc, "chat_template", None) is None:
            raise setup_error(
                self.name, "model", model, "has a processor without a chat template", MODEL_WHAT
            )
        net = net.to(device=self.setup.device, dtype=self.setup.dtype).eval().requires_grad_(False)
        return net, proc

    def token_ids(self, scores: list[str]) -> list[int]:
        """The one token id of each score string; a setup error if one takes several tokens."""
        ids = [self.tokenizer.encode(s, add_special_tokens=False) for s in scores]
        multi = [s for s, i in zip(scores, ids) if len(i) != 1]
        if multi:
            problem = f"has {multi} which are not one token each"
            raise setup_error(
                self.name, "scores", scores, problem, "labels the tokenizer keeps whole"
            )
        return [i[0] for i in ids]

    def render(self, text: str) -> str:
        """The chat prompt of one sample (image first, then the filled template) + answer_prefix."""
        msgs = [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": self.template.format(prompt=text)},
                ],
            }
        ]
        chat = self.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return str(chat) + self.answer_prefix

    def inputs(self, images: list[Tensor], texts: list[str], side: str) -> dict[str, Tensor]:
        """Processor inputs padded on `side`, on the model's device; pixels in the model's dtype."""
        pics = [
            np.ascontiguousarray((x.permute(1, 2, 0) * 255).round().byte().numpy()) for x in images
        ]
        enc = self.processor(
            text=[self.render(t) for t in texts], images=pics, padding=True, padding_side=side,
            return_tensors="pt",
        )  # fmt: skip
        return {
            k: v.to(self.setup.device, self.setup.dtype if v.is_floating_point() else None)
            for k, v in enc.items()
        }

    @torch.no_grad()
    def expected(self, enc: dict[str, Tensor]) -> Tensor:
        """(B,) sum_s value_s * p(s | prompt) / sum_s p(s | prompt), in float32. Right padding:
        real tokens keep the positions they have alone (a plain forward does not shift position
        ids for left padding the way `generate` does), read at each row's last real token."""
        logits = self.model(**enc).logits  # (B, T, V)
        last = enc["attention_mask"].sum(1) - 1  # (B,)
        picked = logits[torch.arange(len(last)), last][:, self.score_ids].float()  # (B, S)
        return (picked.softmax(-1) * self.values.to(picked.device)).sum(-1)

    @torch.no_grad()
    def generate(self, enc: dict[str, Tensor]) -> list[float | None]:
        """Greedy replies (kept in `last_replies`), each parsed by `parse`."""
        out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False)
        replies = self.tokenizer.batch_decode(
            out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
        )
        self.last_replies += replies
        return [self.parse(r) for r in replies]

    def parse(self, reply: str) -> float | None:
        """The first score_pattern group, clamped to the scores' range; else `default` (logged)."""
        m = self.pattern.search(reply)
        try:
            v = float(m[1]) if m else None
        except (TypeError, ValueError):
            v = None
        if v is None:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "vlm_judge: no score in the reply %r; it scores %s (logged once)",
                    reply,
                    self.default,
                )
            return self.default
        return min(max(v, float(self.values.min())), float(self.values.max()))

    def __call__(
        self, outputs: list[Any], args: list[dict], ctx: RewardContext
    ) -> list[float | None]:
        texts = [
            a.get("text") or caption(e.prompt) or prompt_text(e.prompt)
            for a, e in zip(args, ctx.entries)
        ]
        images = [image_to_tensor(o) for o in outputs]
        self.last_replies = []
        out: list[float | None] = []
        for b in range(0, len(images), self.setup.batch_size):
            chunk = slice(b, b + self.setup.batch_size)
            if self.mode == "expected":
                out += self.expected(self.inputs(images[chunk], texts[chunk], "right")).tolist()
            else:  # generate continues every row from its end: left padding
                out += self.generate(self.inputs(images[chunk], texts[chunk], "left"))
        s = self.setup
        return [None if v is None else (v / self.scale - s.norm_mean) / s.norm_std for v in out]
