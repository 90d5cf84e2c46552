"""What every adapter over VQ code grids shares: a condition prefix (`ClassCondition`,
`TextCondition`), then a fixed-length grid of codes (plus layout tokens) sampled inside the
codebook, with classifier-free guidance. `ImageAdapter` (adapters/image.py) and `VideoAdapter`
(adapters/video.py) differ only in grid rank and output format.

Classifier-free guidance (`sampling.cfg_scale = s != 1`): the adapter builds the unconditional
prompt (null class token; or text masked to pad except BOS, as Janus; or a negative prompt),
the shared sampler runs both branches with one KV cache each and samples from
`u + s·(c − u)` on logits. Emu3's log-prob form `u' + s·(c' − u')` (log-softmaxed branches) is
the same distribution: the row constants cancel in the softmax. Training log-probs
(`cfg_train`):
- "same" (default; Janus-Pro-R1, ReasonGen-R1, UniRL): recomputed under the same scale, so
  `token_logprobs` equals the sampler's `sampling_logp`; `detach_uncond` stops the gradient
  through the unconditional branch.
- "conditional" (AR-GRPO, T2I-R1): conditional-only log-probs. The ratio is then taken against
  a distribution the sampler did not use; set `algorithm.is_correction` (e.g. token_truncate)
  to reweight by `exp(old_logp − sampling_logp)`, or accept the bias knowingly.
Every rollout records the scale it was sampled with (`rollout.extras["cfg_scale"]`); a
rollout sampled under another scale than this adapter's is refused.

Emu3's own LM layout ends every row with EOL and the image with EOF: give `eol_token_id` /
`eof_token_id` and the sequence is h·(w + 1) + 1 tokens, the layout tokens forced at their
positions (`SamplingParams.position_ranges`, log-prob exactly 0 in sampling and training alike).
Without them the sequence is the h·w codes alone (LlamaGen's layout).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor

from grpo_ar.generation.params import SamplingParams
from grpo_ar.generation.scoring import token_logprobs
from grpo_ar.types import Entry, PromptBatch, Rollout

from .base import Adapter
from .codes import CodeLayout, to_unit
from .vq import VQDecoder


class ClassCondition:
    """Prompt = class id (int): prefix `[BOS, class_offset + c]`; CFG null `[BOS, null]`.

    `null_token_id` defaults to `class_offset + num_classes` (LlamaGen's extra class row).
    """

    def __init__(
        self,
        class_offset: int,
        num_classes: int,
        bos_token_id: int | None = None,
        null_token_id: int | None = None,
        pad_token_id: int = 0,
    ) -> None:
        if num_classes < 1 or class_offset < 0:
            raise ValueError(
                f"need num_classes >= 1, class_offset >= 0, got {num_classes}, {class_offset}"
            )
        self.class_offset, self.num_classes = class_offset, num_classes
        self.bos = [] if bos_token_id is None else [bos_token_id]
        self.null = class_offset + num_classes if null_token_id is None else null_token_id
        if class_offset <= self.null < class_offset + num_classes:
            raise ValueError(f"null_token_id={self.null} is a class token; reserve another id")
        self.pad_token_id = pad_token_id
        self.max_token_id = max([*self.bos, self.null, class_offset + num_classes - 1])

    def tokens(self, entry: Entry) -> list[int]:
        """The conditional prefix of `entry` (its prompt is a class id)."""
        c = entry.prompt
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < self.num_classes:
            raise ValueError(
                f"class-conditional prompts are int class ids in [0, {self.num_classes}), got {c!r}"
            )
        return [*self.bos, self.class_offset + c]

    def uncond(self, entry: Entry, cond: list[int]) -> list[int]:
        """The CFG unconditional prefix of `entry` (whose conditional prefix is `cond`)."""
        return [*self.bos, self.null]


class TextCondition:
    """Prompt = text, tokenized by a user tokenizer after `template.format(prompt=...)`.

    CFG null (`uncond`): "masked" keeps the length and BOS, every other prompt token becomes pad
    yet stays attended (Janus's `generate`); "negative" encodes `entry.metadata["negative_prompt"]`
    or else `negative_prompt` ("" = the empty prompt). Image-start tokens belong in
    `ImageAdapter(image_prefix_ids=...)`, not in the template, so that masking keeps them.
    """

    def __init__(
        self,
        tokenizer: Any,
        template: str = "{prompt}",
        uncond: Literal["masked", "negative"] = "masked",
        negative_prompt: str = "",
        add_special_tokens: bool = True,
    ) -> None:
        if uncond not in ("masked", "negative"):
            raise ValueError(f"uncond={uncond!r}: use 'masked' or 'negative'")
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        if pad is None:
            raise ValueError(
                "the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token"
            )
        self.tokenizer, self.template, self.mode = tokenizer, template, uncond
        self.negative_prompt, self.add_special_tokens = negative_prompt, add_special_tokens
        self.pad_token_id = pad
        self.max_token_id = len(tokenizer) - 1

    def _encode(self, text: str) -> list[int]:
        ids = self.tokenizer(
            self.template.format(prompt=text), add_special_tokens=self.add_special_tokens
        )["input_ids"]
        return list(ids)

    def tokens(self, entry: Entry) -> list[int]:
        """The conditional prefix of `entry` (its prompt is a string)."""
        if not isinstance(entry.prompt, str):
            raise ValueError(f"text-conditional prompts are strings, got {entry.prompt!r}")
        return self._encode(entry.prompt)

    def uncond(self, entry: Entry, cond: list[int]) -> list[int]:
        """The CFG unconditional prefix of `entry` (whose conditional prefix is `cond`)."""
        if self.mode == "negative":
            return self._encode(str(entry.metadata.get("negative_prompt", self.negative_prompt)))
        keep = self.tokenizer.bos_token_id
        return [t if t == keep else self.pad_token_id for t in cond]


def _left_pad(rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    """Token rows -> (P, L) left-padded ids and attention mask (every row token attended)."""
    if any(not r for r in rows):
        raise ValueError(
            "an (unconditional) prompt is empty; give the condition a BOS token, "
            "image_prefix_ids or a non-empty negative prompt"
        )
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


class CodeGridAdapter(Adapter):
    """Condition prefix -> a fixed-length grid of VQ codes (plus layout tokens), with CFG.

    `layout` places the codes (and EOL/EOF) in the LM sequence; `prefix_ids` follow the condition
    in both CFG branches (e.g. `<begin_of_image>`). Subclasses choose the grid rank (`kind` names
    the sample in messages) and what `decode` returns.
    """

    kind = "a sample"

    def __init__(
        self,
        decoder: VQDecoder,
        sampling: SamplingParams,
        layout: CodeLayout,
        condition: ClassCondition | TextCondition,
        prefix_ids: Sequence[int] = (),
        cfg_train: Literal["same", "conditional"] = "same",
        detach_uncond: bool = False,
        decode_batch_size: int = 0,
    ) -> None:
        decoder.check_grid(layout.grid)
        if layout.codebook_size != decoder.codebook_size:
            raise ValueError(
                f"the layout's codebook has {layout.codebook_size} codes, the decoder's "
                f"{decoder.codebook_size}"
            )
        super().__init__(code_sampling(sampling, layout, self.kind))
        if cfg_train not in ("same", "conditional"):
            raise ValueError(f"cfg_train={cfg_train!r}: use 'same' or 'conditional'")
        if decode_batch_size < 0:
            raise ValueError(f"decode_batch_size must be >= 0, got {decode_batch_size}")
        self.decoder, self.layout, self.condition = decoder, layout, condition
        self.prefix_ids = list(prefix_ids)
        self.cfg_train, self.detach_uncond = cfg_train, detach_uncond
        self.decode_batch_size = decode_batch_size

    @property
    def train_sampling(self) -> SamplingParams:
        """The transform `token_logprobs` applies (cfg_scale 1 under cfg_train="conditional")."""
        if self.cfg_train == "conditional":
            return replace(self.sampling, cfg_scale=1.0)
        return self.sampling

    # -- prompts -----------------------------------------------------------------------------
    def encode(self, entries: Sequence[Entry]) -> PromptBatch:
        cond = [self.condition.tokens(e) for e in entries]
        pad, boi = self.condition.pad_token_id, self.prefix_ids
        batch = PromptBatch(*_left_pad([c + boi for c in cond], pad), list(entries))
        if self.sampling.uses_cfg:  # CFG off: no unconditional branch at all
            rows = [self.condition.uncond(e, c) + boi for e, c in zip(entries, cond)]
            batch.uncond_input_ids, batch.uncond_attention_mask = _left_pad(rows, pad)
        return batch

    # -- sampling and training log-probs -----------------------------------------------------
    def _check_vocab(self, model: Any) -> None:
        head = model.get_output_embeddings()
        vocab = head.weight.shape[0] if head is not None else model.config.vocab_size
        layout = [t for t in (self.layout.eol, self.layout.eof) if t is not None]
        top = max(
            self.layout.code_range[1] - 1, self.condition.max_token_id, *self.prefix_ids, *layout
        )
        if top >= vocab:
            raise ValueError(
                f"token id {top} (codebook range {list(self.layout.code_range)}, condition, "
                f"prefix and layout tokens) does not fit the model's vocabulary of {vocab}"
            )

    def sample(
        self, model: Any, prompts: PromptBatch, group_size: int,
        generator: torch.Generator | None = None, greedy: bool = False,
    ) -> Rollout:  # fmt: skip
        """G grids per prompt (layout.num_tokens each); records the CFG scale sampled with."""
        self._check_vocab(model)
        rollout = super().sample(model, prompts, group_size, generator=generator, greedy=greedy)
        rollout.extras["cfg_scale"] = self.sampling.cfg_scale
        return rollout

    def token_logprobs(
        self, model: Any, rollout: Rollout, with_entropy: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """(n, T) teacher-forced log-probs under `train_sampling`; refuses a rollout sampled
        with another CFG scale."""
        sampled = rollout.extras.get("cfg_scale")
        if sampled is None:
            raise ValueError(
                "the rollout does not record the CFG scale it was sampled with "
                f"(rollout.extras['cfg_scale']); sample it with {type(self).__name__}.sample"
            )
        if sampled != self.sampling.cfg_scale:
            raise ValueError(
                f"the rollout was sampled with cfg_scale={sampled} but this adapter trains "
                f"against cfg_scale={self.sampling.cfg_scale}; use one sampling.cfg_scale for "
                "rollouts and training"
            )
        return token_logprobs(
            self.model_call(model),
            rollout,
            self.train_sampling,
            with_entropy=with_entropy,
            detach_uncond=self.detach_uncond,
        )

    # -- codes and pixels --------------------------------------------------------------------
    def encode_pixels(self, pixels: Tensor) -> Tensor:
        """Pixels in the decoder's range -> (N, layout.num_tokens) LM token ids (e.g. to build
        training sequences); refuses sizes and frame counts the tokenizer cannot take."""
        return self.layout.to_ids(self.decoder.encode(pixels).cpu())

    def decode_codes(self, codes: Tensor) -> Tensor:
        """(N, *grid) codes -> (N, 3, H, W) or (N, T, 3, H, W) float32 in [0, 1], in chunks of
        `decode_batch_size`."""
        step = self.decode_batch_size or max(codes.shape[0], 1)
        parts = [self.decoder.decode(codes[i : i + step]) for i in range(0, codes.shape[0], step)]
        return to_unit(torch.cat(parts), self.decoder.pixel_range)

    def decode_pixels(self, rollout: Rollout) -> Tensor:
        """Float32 pixels in [0, 1]; refuses a wrong token count, a misplaced layout token or a
        token outside the codebook."""
        return self.decode_codes(self.layout.to_codes(rollout.completion_ids))


def code_sampling(sampling: SamplingParams, layout: CodeLayout, kind: str) -> SamplingParams:
    """Fixed-length layout.num_tokens tokens: codes inside the codebook, layout tokens forced at
    their positions, no EOS; a `[sampling]` key set to something else is refused (`kind` names
    the sample: "an image", "a clip")."""
    n, (lo, hi), noun = layout.num_tokens, layout.code_range, kind.split()[-1]
    size = f"the {noun} grid {'x'.join(map(str, layout.grid))} = "
    if n > layout.num_codes:
        size += f"{layout.num_codes} codes + {n - layout.num_codes} EOL/EOF = "
    return sampling.impose(
        {
            "max_new_tokens": (n, f"{size}{n} tokens"),
            "min_new_tokens": (0, f"fixed-length {noun} generation"),
            "eos_token_ids": ((), f"fixed-length {noun} generation (no EOS)"),
            "allowed_ranges": (((lo, hi),), f"the codebook range [{lo}, {hi})"),
            "position_ranges": (layout.position_ranges, "the EOL/EOF layout tokens' positions"),
            # its scorer recomputes log-probs under one transform: spans would be trained on the
            # wrong distribution (a span-aware adapter, e.g. examples/plan_then_image, wraps it)
            "spans": ((), f"one {noun} span (this adapter's scorer has no typed spans)"),
        }
    )
