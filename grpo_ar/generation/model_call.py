"""One call of a transformers causal LM with a KV cache: the keyword names the installed
transformers expects, positions from an attention mask, CFG row stacking. Shared by the sampler,
the decode step and teacher-forced scoring."""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

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
    kw: dict[str, Any] = dict(
        input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=cache is not None
    )
    if cache is not None:
        kw[cache_kwarg(type(model)) or "past_key_values"] = cache  # type: ignore[arg-type]
    if keep and takes_logits_to_keep(type(model)):  # type: ignore[arg-type]
        kw["logits_to_keep"] = keep
    return model(**kw)


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
