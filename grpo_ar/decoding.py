"""The sampler's model calls: prefill once per prompt, then one call per new token against a
preallocated KV cache, so a step costs one model call and a few (rows,)-sized updates.

`transformers.DynamicCache` grows by `torch.cat` of the whole cache at every token (O(T²) bytes
copied and a fresh allocation per layer per step); `PreallocatedLayer` writes each new token into
storage sized for prompt + completion once, and hands attention a view of the filled part.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .sampling import SamplingParams, _forward, _positions


def _layer_classes() -> tuple[type, type]:
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A full-attention cache layer with storage for `capacity` tokens, filled in place."""

        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity, self.length = capacity, 0
            self.k_store: Tensor | None = None
            self.v_store: Tensor | None = None

        def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if self.k_store is None or end > self.k_store.shape[-2]:
                self._grow(key_states, value_states, max(end, self.capacity))
            self.k_store[:, :, self.length : end] = key_states
            self.v_store[:, :, self.length : end] = value_states
            self.length = end
            self.keys = self.k_store[:, :, :end]
            self.values = self.v_store[:, :, :end]
            return self.keys, self.values

        def _grow(self, k: Tensor, v: Tensor, size: int) -> None:
            def new(x: Tensor, old: Tensor | None) -> Tensor:
                store = x.new_empty(*x.shape[:2], size, x.shape[-1])
                if old is not None:
                    store[:, :, : self.length] = old[:, :, : self.length]
                return store

            self.k_store, self.v_store = new(k, self.k_store), new(v, self.v_store)

        def batch_select_indices(self, indices: Tensor) -> None:
            if self.k_store is not None:
                self.k_store, self.v_store = self.k_store[indices], self.v_store[indices]
                self.keys = self.k_store[:, :, : self.length]
                self.values = self.v_store[:, :, : self.length]

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.k_store is not None:
                rows = torch.arange(self.k_store.shape[0], device=self.k_store.device)
                self.batch_select_indices(rows.repeat_interleave(repeats))

    return DynamicCache, PreallocatedLayer


def new_cache(model: Any, capacity: int) -> Any:
    """A DynamicCache whose full-attention layers are preallocated for `capacity` tokens; any
    other layer kind (sliding window, linear attention) keeps transformers' own class."""
    from transformers.cache_utils import DynamicLayer

    dynamic_cache, layer_cls = _layer_classes()
    config = getattr(model, "config", None)
    try:
        cache = dynamic_cache(config=config) if config is not None else dynamic_cache()
    except Exception:  # configs transformers cannot read layer types from
        cache = dynamic_cache()
    if cache.layers:
        cache.layers = [
            layer_cls(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers
        ]
    elif cache.layer_class_to_replicate is DynamicLayer:
        cache.layer_class_to_replicate = lambda: layer_cls(capacity)
    return cache


class Decoder:
    """Prefill, then `step(tokens) -> next logits`, for R running rows (2N with CFG)."""

    def __init__(self, model: Any, params: SamplingParams, use_cache: bool = True) -> None:
        self.model, self.params, self.use_cache = model, params, use_cache
        self.cache: Any = None

    def prefill(self, ids: Tensor, mask: Tensor, group_size: int, share_prefix: bool) -> Tensor:
        """(P', L) prompts (P' = P, or 2P cond+uncond) -> (P'·G, V) logits of the first token.
        Shared: each prompt runs once and its cache is gathered to its G rows."""
        idx = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(group_size)
        width = ids.shape[1]
        self.mask = mask.new_zeros(idx.shape[0], width + self.params.max_new_tokens)
        self.mask[:, :width] = mask[idx]
        self.length = width
        self.pos = mask.long().sum(1)[idx]  # position of the next token
        if not self.use_cache:
            self.ids = ids[idx]
            return self._uncached()
        self.cache = new_cache(self.model, width + self.params.max_new_tokens)
        if share_prefix:
            out = _forward(self.model, ids, mask, _positions(mask), self.cache, keep=1)
            self.cache.batch_select_indices(idx)
            return out.logits[:, -1][idx]
        out = _forward(self.model, ids[idx], mask[idx], _positions(mask[idx]), self.cache, keep=1)
        return out.logits[:, -1]

    def step(self, tok: Tensor) -> Tensor:
        """(R,) tokens just sampled -> (R, V) logits of the next one."""
        self.mask[:, self.length] = 1
        self.length += 1
        if not self.use_cache:
            self.ids = torch.cat([self.ids, tok[:, None]], 1)
            return self._uncached()
        mask = self.mask[:, : self.length]
        out = _forward(self.model, tok[:, None], mask, self.pos[:, None], self.cache, keep=1)
        self.pos = self.pos + 1
        return out.logits[:, -1]

    def select(self, keep: Tensor) -> None:
        """Keep only running rows `keep` (finished rows leave the batch)."""
        self.mask, self.pos = self.mask[keep], self.pos[keep]
        if self.use_cache:
            self.cache.batch_select_indices(keep)
        else:
            self.ids = self.ids[keep]

    def _uncached(self) -> Tensor:
        mask = self.mask[:, : self.length]
        return _forward(self.model, self.ids, mask, _positions(mask), None, keep=1).logits[:, -1]
