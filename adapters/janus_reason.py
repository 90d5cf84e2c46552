"""T2I-R1's BiCoT-GRPO on Janus-Pro (arXiv 2505.00703): a text plan (semantic-level CoT) and then
the image codes (token-level CoT), sampled and trained as ONE completion of typed spans.

`JanusInterleavedCall` ("janus_interleaved" in `MODEL_CALLS`) puts Janus' two vocabularies in one
id space: text ids `[0, V)` (text embeddings in, `lm_head` out) and image codes shifted to
`[V, V + K)` (`generation_aligner(generation_embeddings(code))` in, `generation_head` out).
`embed` routes every position by its id, so one sequence mixes both; `logits` is
`cat(lm_head(h), generation_head(h))`. With each span's `allowed_ranges` inside one head's range
the shared span sampler and scorer (generation/spans.py) run unchanged, and the softmax over a
span's range is exactly that head's own softmax.

`JanusReasonT2IAdapter` (model.adapter = "janus_reason_t2i"): the prompt in Janus' chat format
with T2I-R1's reasoning prompt; spans = a text plan closed by `<begin_of_image>` (or by another
token, EOS say, and then a forced `<begin_of_image>` span; or a fixed-length plan and that forced
span), then the "image" span of the VQ grid's codes. `decode` gives `{"plan": str, "image": ...}`
(or the image alone: `reward_input = "image"`, for the built-in image rewards).

Differences from T2I-R1's code (github.com/CaraJ7/T2I-R1, src/open_r1/trainer/grpo_trainer.py),
on purpose: T2I-R1 samples the plan in one conversation, then re-templates the prompt as
`"<|User|>: {prompt}. {plan}\\n\\n<|Assistant|>:<begin_of_image>"` and samples the image under
that new context with CFG (its unconditional row masks everything between BOS and
`<begin_of_image>` to pad, the plan included) but scores it conditional-only. Here the image
follows the plan in the same sequence, so sampler and scorer see one context and their
log-probs agree exactly; CFG (`sampling.cfg_scale != 1`) is refused with typed spans.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from grpo_ar.errors import ConfigError, need
from grpo_ar.generation.model_call import MODEL_CALLS, ModelCall
from grpo_ar.generation.params import SamplingParams, Span, TreeParams
from grpo_ar.types import Entry, PromptBatch, Rollout

from .base import Adapter
from .code_grid import TextCondition
from .codes import to_pil, to_uint8
from .image import ImageAdapter
from .janus import JanusImageCall, check_janus_section, load_janus
from .vq import JanusVQ

T2I_R1_SYSTEM = (
    "You are a helpful assistant that receives an image prompt and generate a visualization of "
    "the prompt."
)
T2I_R1_REASONING = (
    'You are asked to generate an image based on this prompt: "{prompt}"\n'
    "Provide a brief, precise visualization of all elements in the prompt. Your description "
    "should:\n1. Include every object mentioned in the prompt\n2. Specify visual attributes "
    "(color, number, shape, texture) if specified in the prompt\n3. Clarify relationships (e.g., "
    "spatial) between objects if specified in the prompt\n4. Be concise (50 words or less)\n"
    "5. Focus only on what's explicitly stated in the prompt\n6. Do not elaborate beyond the "
    "attributes or relationships specified in the prompt\nDo not miss objects. Output your "
    "visualization directly without explanation:"
)
"""T2I-R1's data/prompt/reasoning_prompt.txt (stripped, as Janus' conversation strips turns)."""
JANUS_REASON_TEMPLATE = f"{T2I_R1_SYSTEM}\n\n<|User|>: {T2I_R1_REASONING}\n\n<|Assistant|>:"
"""Janus' DeepSeek chat format (system prompt, sep "\\n\\n") around T2I-R1's reasoning prompt."""
REASON_TRAIN = ("language_model", "text_embeddings", "lm_head")
"""T2I-R1 freezes `vision_model`, `aligner` and every `gen*` module (grpo_trainer.py): it trains
the language model with its embeddings and lm_head; the image span's gradient reaches the
generation head only when `train` names "generation"."""


class JointHead(nn.Module):
    """(.., H) -> (.., V + K): `cat(lm_head(h), generation_head(h))`, the text logits then the
    image-code logits (FastStep calls it as the output map)."""

    def __init__(self, text: nn.Module, image: nn.Module) -> None:
        super().__init__()
        self.text, self.image = text, image

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.cat([self.text(hidden), self.image(hidden)], -1)


class JanusInterleavedCall(JanusImageCall):
    """`JanusForConditionalGeneration` writing text and image codes in one sequence: ids below
    `text_vocab` (V) are text, ids `V + c` image code c; outputs are (B, S, V + K) logits."""

    def __init__(self, module: Any) -> None:
        super().__init__(module)
        head = getattr(module, "lm_head", None)
        if not isinstance(head, nn.Module):
            raise ValueError(f"{type(module).__name__} has no lm_head (the text head)")
        self.head = JointHead(head, self.janus.generation_head)

    @property
    def text_vocab(self) -> int:
        """V: the text vocabulary (lm_head's outputs); image code c has id V + c."""
        return int(self.config.vocab_size)

    @property
    def out_features(self) -> int:
        return self.text_vocab + super().out_features

    def embed(self, ids: Tensor, generated: bool) -> Tensor:
        """Per position: text ids -> text embeddings, ids V + c -> the generation embedding +
        aligner of code c (`generated` is not needed: the id says which)."""
        is_code = ids >= self.text_vocab  # (B, S)
        out = self.lm.get_input_embeddings()(ids.masked_fill(is_code, 0))  # (B, S, H)
        if not bool(is_code.any()):
            return out
        gen = self.janus
        codes = gen.generation_aligner(gen.generation_embeddings(ids[is_code] - self.text_vocab))
        return out.index_put((is_code,), codes.to(out.dtype))  # (M, H) into the code positions

    def logits(self, hidden: Tensor) -> Tensor:
        return self.head(hidden)  # (B, S, V + K)

    def head_split(self) -> tuple[ModelCall, nn.Linear] | None:
        """None: the two heads are no single Linear (a block-diagonal one would double the head's
        work); typed spans score through the logits anyway."""
        return None

    def fast_parts(self) -> tuple[Any, Callable[[Tensor], Tensor], nn.Module] | None:
        return self.lm, lambda tok: self.embed(tok[:, None], True)[:, 0], self.head


MODEL_CALLS.register("janus_interleaved")(JanusInterleavedCall)


def reason_spans(
    text_vocab: int, codes: int, n: int, boi: int, close: int, temperature: float = 1.0,
    top_k: int = 0, top_p: float = 1.0,
) -> tuple[Span, ...]:  # fmt: skip
    """The default spans: "plan" (text, closed by `close`), a forced `<begin_of_image>` when
    `close` is another token, then "image" (n codes at ids [V, V + K))."""
    kw: dict[str, Any] = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    plan = Span("plan", close_token=close, allowed_ranges=((0, text_vocab),), **kw)
    image = Span("image", length=n, allowed_ranges=((text_vocab, text_vocab + codes),), **kw)
    if close == boi:
        return plan, image
    forced = Span("boi", length=1, allowed_ranges=((boi, boi + 1),), loss_weight=0, kl_weight=0)
    return plan, forced, image


def check_spans(spans: Sequence[Span], text_vocab: int, codes: int, n: int, boi: int,
                max_new_tokens: int) -> None:  # fmt: skip
    """Refuse spans the interleaved call cannot score as two heads: the last span is the n image
    codes inside [V, V + K), every other span's tokens lie in the text range [0, V), and the
    token before the image is `<begin_of_image>`."""
    *text, image = spans
    lo, hi = text_vocab, text_vocab + codes
    if not text or image.length != n:
        raise ConfigError(
            f"sampling.spans {[s.name for s in spans]}: give a text span, then the image span "
            f"of length = {n} (the VQ grid's codes) last"
        )
    if not image.allowed_ranges or any(a < lo or b > hi for a, b in image.allowed_ranges):
        raise ConfigError(
            f"span {image.name!r} allows {list(image.allowed_ranges)}: give ranges inside the "
            f"image codes [{lo}, {hi}), e.g. allowed_ranges = [[{lo}, {hi}]]"
        )
    for s in text:
        close = () if s.close_token is None else ((s.close_token, s.close_token + 1),)
        if not s.allowed_ranges or any(b > lo for _, b in (*s.allowed_ranges, *close)):
            raise ConfigError(
                f"span {s.name!r} allows {list(s.allowed_ranges)}: a text span samples from "
                f"lm_head alone, give ranges inside [0, {lo}), e.g. allowed_ranges = [[0, {lo}]]"
            )
    last = text[-1]
    forced = last.length == 1 and last.allowed_ranges == ((boi, boi + 1),)
    if last.close_token != boi and not forced:
        raise ConfigError(
            f"span {last.name!r} is followed by the image: close it with close_token = {boi} "
            f"(<begin_of_image>), or add a span of length = 1, allowed_ranges = "
            f"[[{boi}, {boi + 1}]] before the image"
        )
    least = sum(s.length or 1 for s in spans)
    if max_new_tokens < least:
        raise ConfigError(
            f"sampling.max_new_tokens={max_new_tokens} cannot hold the spans (at least {least} "
            f"tokens with {n} image codes); set it to the plan budget + {n}, e.g. {n + 128}"
        )


class JanusReasonT2IAdapter(Adapter):
    """Janus-Pro: a text plan, then the image, in one completion (see the module docstring).
    `model` a transformers `JanusForConditionalGeneration`, `tokenizer` its tokenizer.
    `sampling.spans` empty: the default spans (`reason_spans`, the plan closed by
    `plan_close_token`); given: checked by `check_spans`. No CFG."""

    call_name = "janus_interleaved"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        sampling: SamplingParams,
        template: str = JANUS_REASON_TEMPLATE,
        boi_token: str = "<begin_of_image>",
        plan_close_token: str = "",
        output: Literal["pil", "uint8", "float"] = "pil",
        reward_input: Literal["plan_image", "image"] = "plan_image",
        decode_batch_size: int = 0,
    ) -> None:
        self.boi = token_id(tokenizer, boi_token, "boi_token")
        close = (
            token_id(tokenizer, plan_close_token, "plan_close_token")
            if plan_close_token
            else self.boi
        )
        if sampling.uses_cfg:
            raise ConfigError(
                f"sampling.cfg_scale={sampling.cfg_scale}: janus_reason_t2i samples its typed "
                "spans without classifier-free guidance; set sampling.cfg_scale = 1"
            )
        vq = JanusVQ(model.model.vqmodel)
        n = vq.side * vq.side
        call = JanusInterleavedCall(model)
        self.text_vocab, self.codes = call.text_vocab, int(JanusImageCall(model).out_features)
        spans = sampling.spans or reason_spans(
            self.text_vocab, self.codes, n, self.boi, close, sampling.temperature,
            sampling.top_k, sampling.top_p,
        )  # fmt: skip
        check_spans(spans, self.text_vocab, self.codes, n, self.boi, sampling.max_new_tokens)
        why = "typed spans (each span sets its own tokens)"
        super().__init__(
            replace(sampling, spans=tuple(spans)).impose({
                "min_new_tokens": (0, why), "eos_token_ids": ((), why),
                "allowed_ranges": ((), why), "position_ranges": ((), why),
                "tree": (TreeParams(), "typed spans (no tree sampling)"),
            })
        )  # fmt: skip
        # the image alone: its VQ, grid, pixels and PNGs (codes at offset 0: ids shifted back)
        alone = replace(self.sampling, spans=(), max_new_tokens=n)
        condition = TextCondition(tokenizer, template)
        self.image = ImageAdapter(vq, alone, (vq.side, vq.side), 0, condition, (), output=output,
                                  decode_batch_size=decode_batch_size)  # fmt: skip
        if reward_input not in ("plan_image", "image"):
            raise ValueError(f"reward_input={reward_input!r}: use 'plan_image' or 'image'")
        self.tokenizer, self.reward_input = tokenizer, reward_input
        self.image_index = len(spans) - 1
        if self.codes != vq.codebook_size:
            raise ValueError(
                f"the generation head has {self.codes} outputs but the VQ {vq.codebook_size} "
                "codes: model and VQ do not belong together"
            )
        if condition.max_token_id >= self.text_vocab:
            raise ValueError(
                f"the tokenizer holds {condition.max_token_id + 1} ids, the text vocabulary "
                f"{self.text_vocab}; use the model's own tokenizer"
            )

    def encode(self, entries: Sequence[Entry]) -> PromptBatch:
        return self.image.encode(entries)  # the chat prompt; the model writes the rest

    def image_codes(self, rollout: Rollout) -> tuple[Tensor, Tensor]:
        """((N, h·w) codes, shifted back to [0, K), (N,) bool complete): a row whose budget ran
        out before its image span was full gets codes 0 and complete False."""
        if rollout.span_ids is None:
            raise ValueError("the rollout has no span_ids: sample it with this adapter")
        n = self.image.layout.num_tokens
        sel = (rollout.span_ids == self.image_index) & rollout.completion_mask.bool()  # (N, T)
        complete = sel.sum(1) == n  # (N,)
        codes = torch.zeros(len(complete), n, dtype=torch.long, device=sel.device)
        codes[complete] = rollout.completion_ids[sel & complete[:, None]].view(-1, n)
        return (codes - self.text_vocab).masked_fill(~complete[:, None], 0), complete

    def plans(self, rollout: Rollout) -> list[str]:
        """The text of each row's plan, without `<begin_of_image>` and special tokens."""
        assert rollout.span_ids is not None  # image_codes refuses rollouts without spans
        sel = (rollout.span_ids != self.image_index) & rollout.completion_mask.bool()
        sel &= rollout.completion_ids != self.boi
        return [
            self.tokenizer.decode(ids[m].tolist(), skip_special_tokens=True).strip()
            for ids, m in zip(rollout.completion_ids, sel)
        ]

    def decode_pixels(self, rollout: Rollout) -> Tensor:
        """(N, 3, H, W) float pixels in [0, 1]; black where the image span is incomplete (the
        plan used the budget: a low image reward then teaches shorter plans, as T2I-R1's cut)."""
        codes, complete = self.image_codes(rollout)
        unit = self.image.decode_codes(self.image.layout.to_codes(codes))
        return unit * complete.to(unit.device)[:, None, None, None]

    def decode(self, rollout: Rollout) -> list[Any]:
        unit = self.decode_pixels(rollout)
        kind = self.image.output
        images = list(unit) if kind == "float" else list(to_uint8(unit))
        if kind == "pil":
            images = to_pil(to_uint8(unit))
        if self.reward_input == "image":
            return images
        return [{"plan": p, "image": x} for p, x in zip(self.plans(rollout), images)]

    def summarize(self, output: Any) -> Any:
        if isinstance(output, dict):
            return {"plan": output["plan"], **self.image.summarize(output["image"])}
        return self.image.summarize(output)

    def save_samples(self, outputs: Sequence[Any], directory: str | Path) -> list[Path]:
        """The images as PNGs (`sample_{i:03d}.png`, the paths samples.jsonl shows) and each
        plan beside its image as `sample_{i:03d}.txt` (outputs of reward_input = "plan_image")."""
        images = [o["image"] if isinstance(o, dict) else o for o in outputs]
        paths = self.image.save_samples(images, directory)
        for path, o in zip(paths, outputs):
            if isinstance(o, dict):
                path.with_suffix(".txt").write_text(o["plan"] + "\n", encoding="utf-8")
        return paths

    def save_tokenizer(self, directory: Any) -> None:
        self.tokenizer.save_pretrained(directory)


def token_id(tokenizer: Any, token: str, key: str) -> int:
    """The id of `token`, refusing one the tokenizer does not hold (`key` names the option)."""
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or i == tokenizer.unk_token_id:
        raise ConfigError(f"janus_reason_t2i.{key}={token!r}: the tokenizer has no such token")
    return int(i)


@dataclass(frozen=True)
class JanusReasonConfig:
    """Janus-Pro plan-then-image (model.adapter = "janus_reason_t2i"): model.path holds a
    transformers JanusForConditionalGeneration folder and its tokenizer."""

    prompt_template: str = JANUS_REASON_TEMPLATE
    """How the prompt is wrapped before tokenising (the tokenizer adds BOS)."""
    boi_token: str = "<begin_of_image>"
    """The token before the image codes."""
    plan_close_token: str = ""
    """Token that ends the default plan span ("" = boi_token; another, e.g. EOS, is then
    followed by a forced boi_token). Ignored when [[sampling.spans]] are given."""
    train: list[str] = field(default_factory=lambda: list(REASON_TRAIN))
    """Parts trained: generation, language_model, text_embeddings, lm_head, vision."""
    output: str = "pil"
    """Image kind: pil, uint8 (H, W, 3) or float (3, H, W) in [0, 1]."""
    reward_input: str = "plan_image"
    """plan_image: rewards get {"plan", "image"}; image: the image alone (built-in rewards)."""
    decode_batch_size: int = 0
    """Samples decoded per VQ call (0 = all at once)."""

    def __post_init__(self) -> None:
        for key, val, ok in [
            ("output", self.output, ("pil", "uint8", "float")),
            ("reward_input", self.reward_input, ("plan_image", "image")),
        ]:
            need(val in ok, f"janus_reason_t2i.{key}={val!r}: use one of {', '.join(ok)}")
        check_janus_section(
            "janus_reason_t2i", self.train, self.prompt_template, self.decode_batch_size
        )


def build_janus_reason(
    config: Any, section: JanusReasonConfig | None, device: str, dtype: torch.dtype
) -> tuple[Any, JanusReasonT2IAdapter]:
    """JanusForConditionalGeneration and its tokenizer from model.path; parts outside
    `section.train` frozen."""
    sec = section or JanusReasonConfig()
    model, tok = load_janus(config.model, sec.train, device, dtype)
    adapter = JanusReasonT2IAdapter(
        model, tok, config.sampling, sec.prompt_template, sec.boi_token, sec.plan_close_token,
        sec.output, sec.reward_input, sec.decode_batch_size,  # type: ignore[arg-type]
    )  # fmt: skip
    return model, adapter
