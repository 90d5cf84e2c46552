"""The sampler's model calls: prefill once per prompt, then one call per new token against a
preallocated KV cache, so a step costs one model call and a few (rows,)-sized updates.

`transformers.DynamicCache` grows by `torch.cat` of the whole cache at every token (O(T²) bytes
copied and a fresh allocation per layer per step); `PreallocatedLayer` writes each new token into
storage sized for prompt + completion once, and hands attention a view of the filled part.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .decode_weights import DecodeWeights, active_store, weight_sources
from .model_call import CausalLMCall, ModelCall, as_call, positions
from .params import SamplingParams


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
            assert self.k_store is not None and self.v_store is not None  # grown above
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
            if self.k_store is not None and self.v_store is not None:
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
    other layer kind (sliding window, linear attention) keeps transformers' own class.
    `model`: a model or a ModelCall (the layer kinds are read from its `config`)."""
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
    """Prefill, then `step(tokens) -> next logits`, for R running rows (2N with CFG).
    `model`: a model (its "causal_lm" call) or a ModelCall; every model call goes through it."""

    def __init__(
        self, model: Any, params: SamplingParams, use_cache: bool = True, fast: bool = True
    ) -> None:
        self.call: ModelCall = as_call(model)
        self.model, self.params, self.use_cache, self.allow_fast = model, params, use_cache, fast
        self.cache: Any = None
        self.fast: FastStep | None = None

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
        self.cache = new_cache(self.call, width + self.params.max_new_tokens)
        if self.allow_fast:
            self.fast = fast_step_for(self.call, width + self.params.max_new_tokens)
        if share_prefix:
            out = self.call.forward(ids, mask, positions(mask), self.cache, 1)  # (P', 1, V)
            self.cache.batch_select_indices(idx)
            return out[:, -1][idx]
        out = self.call.forward(ids[idx], mask[idx], positions(mask[idx]), self.cache, 1)
        return out[:, -1]

    def step(self, tok: Tensor) -> Tensor:
        """(R,) tokens just sampled -> (R, V) logits of the next one."""
        self.mask[:, self.length] = 1
        self.length += 1
        if not self.use_cache:
            self.ids = torch.cat([self.ids, tok[:, None]], 1)
            return self._uncached()
        mask, pos = self.mask[:, : self.length], self.pos
        self.pos = self.pos + 1
        if self.fast is not None:
            return self.fast(tok, mask, pos, self.cache)
        return self.call.forward(tok[:, None], mask, pos[:, None], self.cache, 1, True)[:, -1]

    def select(self, keep: Tensor) -> None:
        """Keep only running rows `keep` (finished rows leave the batch)."""
        self.mask, self.pos = self.mask[keep], self.pos[keep]
        if self.use_cache:
            self.cache.batch_select_indices(keep)
        else:
            self.ids = self.ids[keep]

    def _uncached(self) -> Tensor:
        """The whole sequence again (prompt columns as prompt, the rest as sampled tokens)."""
        mask = self.mask[:, : self.length]
        pos = positions(mask)
        width = self.mask.shape[1] - self.params.max_new_tokens  # prompt columns
        if isinstance(self.call, CausalLMCall) or width >= self.ids.shape[1]:
            return self.call.forward(self.ids, mask, pos, None, 1)[:, -1]
        prompt, new = self.ids[:, :width], self.ids[:, width:]
        embeds = torch.cat([self.call.embed(prompt, False), self.call.embed(new, True)], 1)
        return self.call.logits(self.call.run(embeds, mask, pos, None)[:, -1:])[:, -1]


_FAST_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF LlamaRMSNorm, op for op."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _llama_like(body: Any) -> bool:
    """Llama-style decoder body (Llama, Qwen2, Mistral, SmolLM2, Janus' language model, ...):
    plain Linear projections, SiLU gated MLP, RMSNorm, static RoPE tables, full attention, no
    q/k norms."""
    layers = getattr(body, "layers", None)
    rope = getattr(body, "rotary_emb", None)
    if body is None or layers is None or rope is None:
        return False
    if getattr(rope, "rope_type", "default") not in ("default", "linear", "llama3"):
        return False
    lin = lambda m, *names: all(type(getattr(m, n, None)) is nn.Linear for n in names)  # noqa: E731
    norm = lambda m: hasattr(m, "weight") and hasattr(m, "variance_epsilon")  # noqa: E731
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if not (
            lin(attn, "q_proj", "k_proj", "v_proj", "o_proj")
            and lin(mlp, "gate_proj", "up_proj", "down_proj")
            and type(getattr(mlp, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
            and norm(getattr(layer, "input_layernorm", None))
            and norm(getattr(layer, "post_attention_layernorm", None))
            and getattr(attn, "sliding_window", None) is None
            and not hasattr(attn, "q_norm")
        ):
            return False
    return isinstance(getattr(body, "embed_tokens", None), nn.Embedding) and norm(body.norm)


class FastStep:
    """One decode step of a Llama-style model straight from its modules' weights (q/k/v and
    gate/up concatenated, RoPE tables built once) into the preallocated cache: the same math
    as the HF forward without its per-call machinery (~20 Python-level ops per layer). The
    body, the embedding of sampled tokens and the output map come from the ModelCall's
    `fast_parts` (a causal LM: `model.model`, `embed_tokens`, `lm_head`; Janus image
    generation: its language model, generation embeddings + aligner, generation head). A
    Linear output map is applied from transposed weights like the layers; any other module
    (Janus' two-layer head) is called as it is.

    On CPU the step's weights are stored transposed ((in, out), contiguous): with the few rows
    of a decode step, `x @ Wt` ran 1.2-1.7x faster than `F.linear(x, W)` (MKL, SmolLM2 and the
    tiny bench model's shapes; benchmarks/README.md); elsewhere F.linear is used as is. Under
    autocast (model.precision = *-mixed) they are taken in its dtype: the step reads bf16
    weights instead of casting fp32 ones at every token. The copies are taken when the step is
    built (once per `sample` call), or, given a `DecodeWeights` `store`, taken from it: built
    once per weights version the trainer pushes (see `DecodeWeights`).
    """

    def __init__(self, model: Any, capacity: int, store: DecodeWeights | None = None) -> None:
        call = as_call(model)
        parts = call.fast_parts()
        if parts is None:
            raise ValueError(f"{type(model).__name__} has no Llama-style body for FastStep")
        body, self.embed, head = parts
        self.norm = body.norm
        x = body.embed_tokens.weight[:1]
        device = x.device
        self.transposed = device.type == "cpu"
        self.dtype = (
            torch.get_autocast_dtype(device.type)
            if torch.is_autocast_enabled(device.type)
            else None
        )

        def build() -> tuple[Any, list[tuple[Any, ...]]]:
            return (self._lin(head) if type(head) is nn.Linear else head), self.build_layers(body)

        key = (type(call), getattr(call, "hidden", False), self.transposed, self.dtype, device)
        sources = () if store is None else weight_sources(body, head)
        built = build() if store is None else store.get(key, body, sources, build)
        self.head: Any = built[0]
        self.layers: list[tuple[Any, ...]] = built[1]
        cos, sin = body.rotary_emb(x, torch.arange(capacity, device=device)[None])
        self.cos, self.sin = cos[0], sin[0]  # (capacity, hd)

    def build_layers(self, body: Any) -> list[tuple[Any, ...]]:
        layers = []
        for layer in body.layers:
            a, m = layer.self_attn, layer.mlp
            layers.append(
                (layer.input_layernorm, self._lin(a.q_proj, a.k_proj, a.v_proj),
                 self._lin(a.o_proj), layer.post_attention_layernorm,
                 self._lin(m.gate_proj, m.up_proj), self._lin(m.down_proj),
                 a.q_proj.out_features // a.head_dim, a.k_proj.out_features // a.head_dim,
                 a.head_dim, a.scaling)
            )  # fmt: skip
        return layers

    def _lin(self, *linears: nn.Linear) -> tuple[Tensor, Tensor | None]:
        """(weight, bias) of the Linears side by side: (out, in) as F.linear takes it, or
        (in, out) contiguous when `self.transposed`; bias None when the first has none."""
        w = torch.cat([x.weight for x in linears]) if len(linears) > 1 else linears[0].weight
        has_bias = linears[0].bias is not None
        b = torch.cat([x.bias for x in linears]) if has_bias and len(linears) > 1 else None
        b = linears[0].bias if has_bias and len(linears) == 1 else b
        if self.dtype is not None:
            w, b = w.to(self.dtype), (None if b is None else b.to(self.dtype))
        return (w.t().contiguous() if self.transposed else w), b

    def _apply(self, x: Tensor, wb: tuple[Tensor, Tensor | None]) -> Tensor:
        w, b = wb
        if not self.transposed:
            return F.linear(x, w, b)
        return x @ w if b is None else torch.addmm(b, x, w)

    def __call__(self, tok: Tensor, mask: Tensor, pos: Tensor, cache: Any) -> Tensor:
        """(R,) tokens at positions (R,), (R, S) attention mask incl. them -> (R, V) logits."""
        x = self.embed(tok)  # (R, H)
        r, at = tok.shape[0], mask.shape[1] - 1
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # (R, 1, hd)
        keep = mask.bool()[:, None, None, :]  # (R, 1, 1, S)
        lin = self._apply
        for i, (ln1, qkv_w, o_w, ln2, gu_w, down_w, nh, nkv, hd, scale) in enumerate(self.layers):
            qkv = lin(_rms(x, ln1.weight, ln1.variance_epsilon), qkv_w)
            q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], -1)
            q, k = _rope(q.view(r, nh, hd), cos, sin), _rope(k.view(r, nkv, hd), cos, sin)
            layer = cache.layers[i]
            layer.k_store[:, :, at] = k
            layer.v_store[:, :, at] = v.view(r, nkv, hd)
            keys, values = layer.k_store[:, :, : at + 1], layer.v_store[:, :, : at + 1]
            att = F.scaled_dot_product_attention(
                q[:, :, None], keys, values, keep, scale=scale, enable_gqa=nh != nkv
            )
            x = x + lin(att.reshape(r, nh * hd), o_w)
            gate, up = lin(_rms(x, ln2.weight, ln2.variance_epsilon), gu_w).chunk(2, -1)
            x = x + lin(F.silu(gate) * up, down_w)
        for layer in cache.layers:
            layer.length = at + 1
        x = _rms(x, self.norm.weight, self.norm.variance_epsilon)
        return lin(x, self.head) if isinstance(self.head, tuple) else self.head(x)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def _sharded(module: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without distributed: nothing can be sharded
        return False
    return any(isinstance(m, FSDPModule) for m in module.modules())


@torch.no_grad()
def fast_step_for(model: Any, capacity: int) -> FastStep | None:
    """A FastStep when the model call has a Llama-style body (`ModelCall.fast_parts`) and one
    step of it reproduces the call's own `forward` (checked once per model and kind of call on
    a left-padded 2-row input), else None. `model`: a model or a ModelCall. Inside
    `reusing(store)` its weights come from `store`."""
    call = as_call(model)
    kind = (type(call), getattr(call, "hidden", False))
    if not isinstance(call.module, nn.Module):
        return None
    seen = _FAST_OK.setdefault(call.module, {})
    ok = seen.get(kind)
    if ok is None:
        parts = call.fast_parts()
        ok = False
        if parts is not None and _llama_like(parts[0]):
            device = parts[0].norm.weight.device
            with torch.autocast(device.type, enabled=False):  # an fp32 check
                ok = _check(call)
        seen[kind] = ok
    if not ok:
        return None
    store = active_store()
    return FastStep(call, capacity, None if store is None or _sharded(call.module) else store)


def _check(call: ModelCall) -> bool:
    try:
        device = next(call.module.parameters()).device
        v = min(call.out_features, int(getattr(call.config, "vocab_size", 10)))
        ids = torch.tensor([[0, 5, 6], [7, 8, 9]], device=device) % v
        mask = torch.tensor([[0, 1, 1], [1, 1, 1]], device=device)
        full = torch.cat([mask, mask[:, :1] * 0 + 1], 1)
        tok, pos = torch.tensor([3, 4], device=device) % v, mask.sum(1)
        logits = []
        for fast in (False, True):
            cache = new_cache(call, 6)
            call.forward(ids, mask, positions(mask), cache, 1)
            if fast:
                logits.append(FastStep(call, 6)(tok, full, pos, cache))
            else:
                logits.append(call.forward(tok[:, None], full, pos[:, None], cache, 1, True)[:, -1])
        want, got = (x.float() for x in logits)
        return bool(((got - want).abs() <= 1e-4 * (want.abs().max() + 1)).all())
    except Exception:
        return False
