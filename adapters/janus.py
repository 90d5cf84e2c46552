"""Janus / Janus-Pro text-to-image (T2I-R1, Janus-Pro-R1, ReasonGen-R1, UniRL) on transformers'
`JanusForConditionalGeneration`.

Janus generates image codes in a vocabulary of their own: a prompt runs through the text
embeddings, each image code through `generation_embeddings` + `generation_aligner`
(`prepare_embeddings_for_image_generation`), and the next code's logits come from
`generation_head` (not `lm_head`, the understanding head). `JanusImageCall` is that model call
(registered as "janus_image" in `generation.model_call.MODEL_CALLS`), so the shared sampler,
teacher-forced scoring, CFG, packing and the fast decode step (Janus' language model is a Llama;
the generation head is its output map) run unchanged.

`JanusT2IAdapter` is an `ImageAdapter` with Janus' own pieces:
- prompt: `JANUS_T2I_TEMPLATE` (the `<|User|>` / `<|Assistant|>` chat format of Janus-Pro's chat
  template with an empty system prompt) tokenized with BOS, then `<begin_of_image>`, as the
  Janus processor's `generation_mode="image"` builds it;
- CFG unconditional prompt as `generate(generation_mode="image")` builds it: the same tokens
  with every one but BOS and `<begin_of_image>` replaced by pad, still attended; logits
  `u + s·(c − u)` (the shared `cfg_scale` path);
- image codes 0..K-1 of its `JanusVQVAE` (`code_offset` 0 in the generation vocabulary),
  decoded to pixels by it (`vq.JanusVQ`) for image rewards.

What is trained (`janus_trainable`): by default the generation path (generation embeddings,
aligner and head) and the language model's layers and final norm; the understanding `lm_head`,
the text embeddings (tied to `lm_head` in JanusConfig's default), the vision tower and the VQ
stay frozen (requires_grad False) unless `train` names them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from grpo_ar.errors import need
from grpo_ar.generation.model_call import MODEL_CALLS, ModelCall, cache_kwarg
from grpo_ar.generation.params import SamplingParams

from .code_grid import TextCondition
from .image import ImageAdapter
from .vq import JanusVQ

JANUS_T2I_TEMPLATE = "<|User|>: {prompt}\n\n<|Assistant|>:"
"""Janus-Pro's chat format for one user turn and the assistant's turn opened (DeepSeek's
`sft_format` with system prompt ""; transformers' Janus chat template gives the same string)."""

# parameter-name prefixes of each trainable part, inside JanusForConditionalGeneration
PARTS = {
    "generation": ("model.generation_embeddings.", "model.generation_aligner.",
                   "model.generation_head."),
    "language_model": ("model.language_model.layers.", "model.language_model.norm."),
    "text_embeddings": ("model.language_model.embed_tokens.",),
    "lm_head": ("lm_head.",),
    "vision": ("model.vision_model.", "model.aligner."),
}  # fmt: skip
DEFAULT_TRAIN = ("generation", "language_model")


class JanusImageCall(ModelCall):
    """`JanusForConditionalGeneration` generating an image: prompt ids -> text embeddings,
    sampled codes -> `generation_aligner(generation_embeddings(codes))`, the language model with
    its KV cache, `generation_head` -> (B, S, K) code logits. `features=True`: the head's input
    to its last Linear (`vision_head`), for the fused log-prob path."""

    def __init__(self, module: Any, features: bool = False) -> None:
        janus: Any = getattr(module, "model", None)
        if not all(
            hasattr(janus, n)
            for n in ("language_model", "generation_embeddings", "generation_head")
        ):
            raise ValueError(
                f"{type(module).__name__} is not a transformers JanusForConditionalGeneration "
                "(no model.language_model / generation_embeddings / generation_head)"
            )
        self.module, self.features = module, features
        self.janus: Any = janus
        self.lm: Any = janus.language_model

    @property
    def config(self) -> Any:
        return self.lm.config

    @property
    def attn_module(self) -> nn.Module:
        return self.lm

    @property
    def out_features(self) -> int:
        return int(self.janus.generation_head.vision_head.out_features)

    def embed(self, ids: Tensor, generated: bool) -> Tensor:
        if generated:  # == prepare_embeddings_for_image_generation
            return self.janus.generation_aligner(self.janus.generation_embeddings(ids))
        return self.lm.get_input_embeddings()(ids)

    def run(self, embeds: Tensor, mask: Tensor, pos: Tensor, cache: Any) -> Tensor:
        kw: dict[str, Any] = dict(
            inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=cache is not None
        )
        if cache is not None:
            kw[cache_kwarg(type(self.lm)) or "past_key_values"] = cache  # type: ignore[arg-type]  # a class is hashable
        return self.lm(**kw).last_hidden_state

    def logits(self, hidden: Tensor) -> Tensor:
        head = self.janus.generation_head
        if self.features:  # vision_head's input
            return head.activation_fn(head.proj_out(hidden))
        return head(hidden)

    def head_split(self) -> tuple[ModelCall, nn.Linear] | None:
        """(features call, vision_head) while vision_head is a plain Linear: an adapted one
        (peft's LoRA Linear, LyCORIS' patched Linear) is more than its `.weight`, and the
        fused path reads only that; it then takes the logits path."""
        head = self.janus.generation_head.vision_head
        if self.features or type(head) is not nn.Linear:
            return None
        return JanusImageCall(self.module, True), head

    def takes_cache(self) -> bool:
        return cache_kwarg(type(self.lm)) is not None  # type: ignore[arg-type]  # a class is hashable

    def fast_parts(self) -> tuple[Any, Callable[[Tensor], Tensor], nn.Module] | None:
        if self.features:
            return None
        gen = self.janus
        return (
            self.lm,
            lambda tok: gen.generation_aligner(gen.generation_embeddings(tok)),
            (gen.generation_head),
        )


MODEL_CALLS.register("janus_image")(JanusImageCall)


class JanusT2IAdapter(ImageAdapter):
    """Janus-Pro text-to-image: `model` a transformers `JanusForConditionalGeneration`,
    `tokenizer` its tokenizer (with `<begin_of_image>` and a pad token). The grid is the VQ's
    num_patches² codes; `template` wraps the prompt (`JANUS_T2I_TEMPLATE`; the tokenizer adds
    BOS). Other arguments as `ImageAdapter`."""

    call_name = "janus_image"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        sampling: SamplingParams,
        template: str = JANUS_T2I_TEMPLATE,
        boi_token: str = "<begin_of_image>",
        uncond: Literal["masked", "negative"] = "masked",
        negative_prompt: str = "",
        cfg_train: Literal["same", "conditional"] = "same",
        detach_uncond: bool = False,
        output: Literal["pil", "uint8", "float"] = "pil",
        decode_batch_size: int = 0,
    ) -> None:
        boi = tokenizer.convert_tokens_to_ids(boi_token)
        if boi is None or boi == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {boi_token!r} token; give boi_token")
        vq = JanusVQ(model.model.vqmodel)
        condition = TextCondition(tokenizer, template, uncond, negative_prompt)
        super().__init__(
            vq, sampling, (vq.side, vq.side), 0, condition, [boi], cfg_train, detach_uncond,
            output, decode_batch_size,
        )  # fmt: skip

    def save_tokenizer(self, directory: Any) -> None:
        """The tokenizer, so the exported folder loads as a Janus model + tokenizer again."""
        self.condition.tokenizer.save_pretrained(directory)  # type: ignore[union-attr]

    def _check_vocab(self, model: Any) -> None:
        """The generation head samples exactly the VQ's codes; the prompt fits the text vocab."""
        call = self.model_call(model)
        codes = call.out_features
        if codes != self.decoder.codebook_size:
            raise ValueError(
                f"the generation head has {codes} outputs but the VQ {self.decoder.codebook_size} "
                "codes: model and VQ do not belong together"
            )
        top = max(self.condition.max_token_id, *self.prefix_ids)
        if top >= int(call.config.vocab_size):
            raise ValueError(
                f"prompt token id {top} does not fit the text vocabulary of "
                f"{call.config.vocab_size}; use the model's own tokenizer"
            )


def janus_trainable(model: nn.Module, parts: Sequence[str] = DEFAULT_TRAIN) -> list[str]:
    """Freeze every parameter of a JanusForConditionalGeneration but those of `parts` (keys of
    `PARTS`); returns the trained parameter names. A tensor tied across parts (the default
    JanusConfig ties `lm_head` to the text embeddings) is trained when either part is named."""
    check_parts("janus_trainable parts", parts)
    prefixes = tuple(p for part in parts for p in PARTS[part])
    trained = {
        id(p) for n, p in model.named_parameters(remove_duplicate=False) if n.startswith(prefixes)
    }
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
    return [n for n, p in model.named_parameters() if p.requires_grad]


@dataclass(frozen=True)
class JanusT2IConfig:
    """Janus-Pro text-to-image (model.adapter = "janus_t2i"): model.path holds a transformers
    JanusForConditionalGeneration folder and its tokenizer."""

    prompt_template: str = JANUS_T2I_TEMPLATE
    """How the prompt string is wrapped before tokenising (the tokenizer adds BOS)."""
    boi_token: str = "<begin_of_image>"
    """The image-start token after the prompt (kept in the CFG unconditional prompt)."""
    uncond: str = "masked"
    """CFG null prompt: masked (Janus' own: pad except BOS and <begin_of_image>) or negative."""
    negative_prompt: str = ""
    """Default negative prompt for uncond = negative."""
    cfg_train: str = "same"
    """same: train under sampling.cfg_scale; conditional: cond-only (use algorithm.is_correction)."""
    detach_uncond: bool = False
    """Under cfg_train = same: no gradient through the unconditional branch."""
    train: list[str] = field(default_factory=lambda: list(DEFAULT_TRAIN))
    """Parts trained: generation, language_model, text_embeddings, lm_head, vision."""
    output: str = "pil"
    """What rewards receive: pil, uint8 (H, W, 3) or float (3, H, W) in [0, 1]."""
    decode_batch_size: int = 0
    """Samples decoded per VQ call (0 = all at once)."""

    def __post_init__(self) -> None:
        for key, val, ok in [
            ("uncond", self.uncond, ("masked", "negative")),
            ("cfg_train", self.cfg_train, ("same", "conditional")),
            ("output", self.output, ("pil", "uint8", "float")),
        ]:
            need(val in ok, f"janus_t2i.{key}={val!r}: use one of {', '.join(ok)}")
        check_janus_section("janus_t2i", self.train, self.prompt_template, self.decode_batch_size)


def check_janus_section(section: str, train: Sequence[str], prompt_template: str,
                        decode_batch_size: int) -> None:  # fmt: skip
    """The keys every Janus adapter section shares ([janus_t2i], [janus_reason_t2i]): trained
    parts among PARTS, a template holding {prompt}, a decode batch >= 0."""
    check_parts(f"{section}.train", train)
    need("{prompt}" in prompt_template, f"{section}.prompt_template needs {{prompt}}")
    need(decode_batch_size >= 0, f"{section}.decode_batch_size must be >= 0")


def check_parts(name: str, parts: Sequence[str]) -> None:
    """`parts` names one or more of PARTS (the trainable pieces of a Janus model)."""
    need(
        bool(parts) and set(parts) <= set(PARTS),
        f"{name}={list(parts)}: name one or more of {', '.join(PARTS)}",
    )


def load_janus(m: Any, train: Sequence[str], device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """JanusForConditionalGeneration (VQ in fp32) and its tokenizer from `m.path` (a
    ModelConfig), the parts outside `train` frozen."""
    from transformers import AutoTokenizer, JanusForConditionalGeneration

    kw: dict[str, Any] = {"dtype": dtype}
    if m.attn_implementation:
        kw["attn_implementation"] = m.attn_implementation
    model = JanusForConditionalGeneration.from_pretrained(m.path, **kw).to(device)  # type: ignore[arg-type]
    model.model.vqmodel.float()  # decode in fp32 whatever the LM's dtype
    janus_trainable(model, train)
    return model, AutoTokenizer.from_pretrained(m.path)


def build_janus_t2i(
    config: Any, section: JanusT2IConfig | None, device: str, dtype: torch.dtype
) -> tuple[Any, JanusT2IAdapter]:
    """JanusForConditionalGeneration and its tokenizer from model.path; the parts outside
    `section.train` frozen."""
    sec = section or JanusT2IConfig()
    model, tok = load_janus(config.model, sec.train, device, dtype)
    adapter = JanusT2IAdapter(
        model, tok, config.sampling, sec.prompt_template, sec.boi_token, sec.uncond,  # type: ignore[arg-type]
        sec.negative_prompt, sec.cfg_train, sec.detach_uncond, sec.output,  # type: ignore[arg-type]
        sec.decode_batch_size,
    )  # fmt: skip
    return model, adapter
