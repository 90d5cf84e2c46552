"""The model-call seam under the sampler, the decode step and teacher-forced scoring: how a model
turns token ids into next-token outputs with a KV cache.

A `ModelCall` is three steps, `embed(ids, generated) -> (B, S, H)`, `run(embeds, mask, pos,
cache) -> (B, S, H)` (the transformer) and `logits(hidden) -> (B, S, V)`, composed by
`forward`. `generated` says whether the ids are prompt tokens or sampled ones: models whose
sampled tokens live in another vocabulary than their prompts (Janus' image codes) embed them
apart. The sampler (prefill, steps, CFG rows), scoring (shared prefix, packing, trees), the
multi-turn decoder and `decode_step.FastStep` call only this interface.

Implementations are registered by name in `MODEL_CALLS`: "causal_lm" (the default: a
transformers causal LM, one HF call per forward, exactly the call made before the seam),
"janus_image" (adapters/janus.py) and "janus_interleaved" (Janus' text and image vocabularies
in one id space, for a text plan then the image: adapters/janus_reason.py). An adapter chooses its call with `Adapter.model_call`;
generation functions take either a model (wrapped as "causal_lm") or a ModelCall.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.registry import Registry
from ..types import PromptBatch


@lru_cache(maxsize=64)
def takes_logits_to_keep(cls: type[torch.nn.Module]) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


@lru_cache(maxsize=64)
def cache_kwarg(cls: type[torch.nn.Module]) -> str | None:
    """The name under which `cls.forward` takes a KV cache: `cache` (transformers >= 5.24),
    `past_key_values` (earlier releases), or None when it takes none."""
    params = inspect.signature(cls.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def forward(model: Any, ids: Tensor, mask: Tensor, pos: Tensor, cache: Any, keep: int) -> Any:
    """One HF call of `model` (its output object), the keywords the installed transformers
    expects; `keep` > 0: logits of the last `keep` positions only, where the model allows."""
    kw: dict[str, Any] = dict(
        input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=cache is not None
    )
    if cache is not None:
        kw[cache_kwarg(type(model)) or "past_key_values"] = cache  # type: ignore[arg-type]
    if keep and takes_logits_to_keep(type(model)):  # type: ignore[arg-type]
        kw["logits_to_keep"] = keep
    return model(**kw)


class ModelCall(ABC):
    """How one model maps (B, S) token ids at positions `pos`, under an attention `mask`
    ((B, S_total) 2D, or a 4D mask for packing), with a KV cache, to (B, S, X) outputs.

    `module` is what is trained (its parameters, train/eval mode); `config` the transformer's
    config (cache layer kinds, attention implementation, sizes). `forward` is
    `logits(run(embed(ids, generated), mask, pos, cache))`; implementations may override it
    with an equal faster call (the causal LM's single HF call)."""

    module: Any  # an nn.Module (typed Any: transformers' methods, not only Module's)

    @abstractmethod
    def embed(self, ids: Tensor, generated: bool) -> Tensor:
        """(B, S) ids -> (B, S, H) input embeddings; `generated`: sampled tokens, not prompt."""

    @abstractmethod
    def run(self, embeds: Tensor, mask: Tensor, pos: Tensor, cache: Any) -> Tensor:
        """(B, S, H) embeddings -> (B, S, H) last hidden states (the cache is updated)."""

    @abstractmethod
    def logits(self, hidden: Tensor) -> Tensor:
        """(B, S, H) hidden states -> (B, S, X) outputs (logits; `features` for a head split)."""

    @property
    @abstractmethod
    def config(self) -> Any:
        """The transformer's config (layer kinds, `_attn_implementation`, hidden size)."""

    @property
    def attn_module(self) -> nn.Module:
        """The module whose config and parameters packed scoring reads (4D-mask kind, dtype)."""
        return self.module

    def forward(
        self, ids: Tensor, mask: Tensor, pos: Tensor, cache: Any, keep: int = 0,
        generated: bool = False,
    ) -> Tensor:  # fmt: skip
        """(B, S) ids -> (B, S, X) outputs; `keep` > 0 lets it compute the last `keep` only."""
        hidden = self.run(self.embed(ids, generated), mask, pos, cache)  # (B, S, H)
        return self.logits(hidden[:, -keep:] if keep else hidden)

    def head_split(self) -> tuple[ModelCall, nn.Linear] | None:
        """(features call, head) with `head(features.forward(x)) == forward(x)` (a final
        linear layer), so scoring can project only the real tokens and recompute in backward
        (`core.logprobs.fused_head_logprobs`); None: only logits."""
        return None

    def takes_cache(self) -> bool:
        """Whether `run` takes a KV cache (and keeps it under activation checkpointing)."""
        return True

    def fast_parts(self) -> tuple[Any, Callable[[Tensor], Tensor], nn.Module] | None:
        """(Llama-style body, embedding of sampled (R,) tokens -> (R, H), output map
        (R, H) -> (R, V)) for `decode_step.FastStep`, or None when there is no such split.
        `fast_step_for` still checks the step against `forward` before using it."""
        return None

    @property
    def out_features(self) -> int:
        """Size of the sampled vocabulary (the logits' last dimension)."""
        return int(self.config.vocab_size)


MODEL_CALLS: Registry[Callable[[nn.Module], ModelCall]] = Registry("model call")
"""Name -> (model -> ModelCall). "causal_lm" is the default; adapters register their own."""


class CausalLMCall(ModelCall):
    """A transformers causal LM (or any module called like one): `forward` is the one HF call
    `model(input_ids=..., attention_mask=..., position_ids=..., cache=..., logits_to_keep=...)`
    and returns `.logits`, or `.last_hidden_state` when `hidden` (the call of a body).
    `embed`/`run`/`logits` are the same split through `get_input_embeddings`, `model.model` and
    `get_output_embeddings`, for callers that need the parts."""

    def __init__(self, module: Any, hidden: bool = False) -> None:
        self.module, self.hidden = module, hidden

    @property
    def config(self) -> Any:
        return getattr(self.module, "config", None)

    def embed(self, ids: Tensor, generated: bool) -> Tensor:
        return self.module.get_input_embeddings()(ids)

    def run(self, embeds: Tensor, mask: Tensor, pos: Tensor, cache: Any) -> Tensor:
        body = self.module if self.hidden else self.module.model
        kw: dict[str, Any] = dict(
            inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=cache is not None
        )
        if cache is not None:
            kw[cache_kwarg(type(body)) or "past_key_values"] = cache  # type: ignore[arg-type]
        return body(**kw).last_hidden_state

    def logits(self, hidden: Tensor) -> Tensor:
        return hidden if self.hidden else self.module.get_output_embeddings()(hidden)

    def forward(
        self, ids: Tensor, mask: Tensor, pos: Tensor, cache: Any, keep: int = 0,
        generated: bool = False,
    ) -> Tensor:  # fmt: skip
        out = forward(self.module, ids, mask, pos, cache, 0 if self.hidden else keep)
        return out.last_hidden_state if self.hidden else out.logits

    def head_split(self) -> tuple[ModelCall, nn.Linear] | None:
        split = None if self.hidden else head_split(self.module)
        return None if split is None else (CausalLMCall(split[0], hidden=True), split[1])

    def takes_cache(self) -> bool:
        return cache_kwarg(type(self.module)) is not None  # type: ignore[arg-type]  # a class is hashable

    def fast_parts(self) -> tuple[Any, Callable[[Tensor], Tensor], nn.Module] | None:
        body, head = getattr(self.module, "model", None), getattr(self.module, "lm_head", None)
        embed = getattr(body, "embed_tokens", None)
        if self.hidden or not isinstance(body, nn.Module) or type(head) is not nn.Linear:
            return None
        return (body, embed, head) if isinstance(embed, nn.Embedding) else None

    @property
    def out_features(self) -> int:
        head = getattr(self.module, "lm_head", None)
        return int(head.out_features) if isinstance(head, nn.Linear) else super().out_features


MODEL_CALLS.register("causal_lm")(CausalLMCall)


def as_call(model: Any) -> ModelCall:
    """`model` itself when it is a ModelCall, else the default "causal_lm" call of it (cheap:
    what it checks is cached per model object)."""
    return model if isinstance(model, ModelCall) else CausalLMCall(model)


_SPLIT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def head_split(model: Any) -> tuple[nn.Module, nn.Linear] | None:
    """(body, head) when `model(x).logits == head(body(x).last_hidden_state)` (checked once per
    model on a 3-token input: logit soft-capping or scaling would fail it), else None."""
    try:
        return _SPLIT[model]
    except (KeyError, TypeError):
        pass
    body = getattr(model, "model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else getattr(model, "lm_head", None)
    split = None
    if isinstance(body, nn.Module) and type(head) is nn.Linear and _same_logits(model, body, head):
        split = (body, head)
    with contextlib.suppress(TypeError):  # objects that cannot be weakly referenced
        _SPLIT[model] = split
    return split


@torch.no_grad()
def _same_logits(model: Any, body: nn.Module, head: nn.Linear) -> bool:
    was_training = model.training
    model.eval()
    try:
        ids = torch.tensor([[1, 2, 3]], device=head.weight.device) % head.out_features
        want = model(input_ids=ids).logits.float()
        got = head(body(input_ids=ids).last_hidden_state).float()
        scale = float(want.abs().max()) + 1.0
        return got.shape == want.shape and bool(((got - want).abs() <= 1e-4 * scale).all())
    except Exception:  # any other calling convention: the logits path is always correct
        return False
    finally:
        model.train(was_training)


def stack_cfg(prompts: PromptBatch) -> tuple[Tensor, Tensor]:
    """Cond rows then uncond rows, left-padded to one width: (2P, L)."""
    ids, mask = prompts.input_ids, prompts.attention_mask
    uids, umask = prompts.uncond_input_ids, prompts.uncond_attention_mask
    if uids is None or umask is None:
        raise ValueError("cfg_scale != 1 needs the adapter to build unconditional prompts")
    width = max(ids.shape[1], uids.shape[1])
    pad = lambda t, v: F.pad(t, (width - t.shape[1], 0), value=v)  # noqa: E731
    return torch.cat([pad(ids, 0), pad(uids, 0)]), torch.cat([pad(mask, 0), pad(umask, 0)])


def positions(mask: Tensor) -> Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
