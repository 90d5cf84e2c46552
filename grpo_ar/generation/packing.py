"""Packed completions after a shared prompt KV cache (the scoring pass's padding cut).

`scoring.completion_outputs` runs each prompt once and continues its G completions from the
gathered cache. Padded, that is N rows of the longest completion: with lengths 12..64 most of the
compute is padding. Packed, the completions of a prompt are laid back to back in rows ("bins",
first fit, longest first, at the capacity that runs the fewest tokens once attention is counted:
`best_bins`), and a 4D attention mask lets each token see its prompt's keys and the earlier
tokens of its own completion only; positions restart after the prompt. It is used when it runs
fewer bins than there are samples.

The model must honour a custom 4D mask with a KV cache (HF `sdpa` takes it as bool, `eager` as
an additive float mask). `packing_ok` checks that once per model on a small input against the
padded path and falls back to padding otherwise.

Varlen kernels (flash_attention_2/3: `cu_seqlens`) take no custom mask and cannot share a prefix:
for them `position_packed` lays every sample's full sequence (its prompt, then its completion)
back to back in one row with position ids restarting at 0 and no mask, which transformers turns
into `cu_seqlens` for flash attention (modeling_flash_attention_utils `_is_packed_sequence`) and
into a block-causal mask for sdpa / eager / flex (masking_utils `find_packed_sequence_indices`).
Which layout runs is `trainer.packing` (`set_packing`): auto (position ids under a flash kernel,
else the 4D mask), mask, position_ids or off.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch
from torch import Tensor

from .model_call import CausalLMCall

_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # net -> {layout: passed}
_MODE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> trainer.packing
MASK_KINDS = {"sdpa": "bool", "eager": "float"}
PACKING_MODES = ("auto", "mask", "position_ids", "off")


def _attn_kind(net: Any) -> str | None:
    return MASK_KINDS.get(_impl(net))


def _impl(net: Any) -> str:
    return getattr(getattr(net, "config", None), "_attn_implementation", None) or ""


def set_packing(model: Any, mode: str) -> None:
    """Score `model` (any of its modules a scoring call reaches) with packing `mode`, one of
    PACKING_MODES; models never set take "auto"."""
    if mode not in PACKING_MODES:
        raise ValueError(f"packing={mode!r}: use one of {', '.join(PACKING_MODES)}")
    for m in model.modules():
        _MODE[m] = mode


def packing_mode(net: Any) -> tuple[str, bool]:
    """(layout, asked): "mask", "position_ids" or "off" for `net`, and whether the layout was
    set explicitly (else resolved from "auto": position ids under a flash kernel, whose varlen
    path takes no 4D mask; the 4D mask otherwise)."""
    try:
        mode = _MODE.get(net, "auto")
    except TypeError:  # objects that cannot be weakly referenced
        mode = "auto"
    if mode != "auto":
        return mode, True
    return ("position_ids" if "flash" in _impl(net) else "mask"), False


# bin capacities tried: k x the longest completion, k = 1..16, up to max(longest, MAX_PACK_WIDTH)
MAX_PACK_WIDTH = 512


def bins(prompt_of: list[int], need: list[int], width: int = 0) -> list[list[int]]:
    """Sample rows grouped into bins: each bin holds samples of one prompt whose `need` (tokens to
    run) sum to at most max(max(need), width); first fit, longest first. Samples needing 0
    tokens get none."""
    cap = max(max(need, default=0), width)
    out: list[list[int]] = []
    room: list[int] = []
    of_prompt: dict[int, list[int]] = {}  # a prompt's bins, in the order they were opened
    for i in sorted(range(len(need)), key=lambda i: (-need[i], i)):
        if need[i] == 0:
            continue
        mine = of_prompt.setdefault(prompt_of[i], [])
        b = next((b for b in mine if room[b] >= need[i]), None)
        if b is None:
            b = len(out)
            out.append([])
            room.append(cap)
            mine.append(b)
        out[b].append(i)
        room[b] -= need[i]
    return out


def best_bins(
    prompt_of: list[int], need: list[int], prompt_width: int, hidden: int
) -> list[list[int]]:
    """The bins that cost least to run: bins are run as rows of the fullest one, so a capacity
    costs rows x width x (1 + attention), attention ~ (prompt + width) / (6 · hidden) of a
    token's matmul FLOPs (QK and AV against 24·hidden² for the layer's projections and MLP).
    Capacities tried: k x max(need), k <= 16, up to max(max(need), MAX_PACK_WIDTH)."""
    longest = max(need, default=0)
    best: tuple[float, list[list[int]]] | None = None
    for k in range(1, min(16, max(1, MAX_PACK_WIDTH // max(longest, 1))) + 1):
        out = bins(prompt_of, need, k * longest)
        width = max((sum(need[i] for i in b) for b in out), default=0)
        cost = len(out) * width * (1 + (prompt_width + width) / (6 * hidden))
        if best is None or cost < best[0]:
            best = (cost, out)
    return best[1] if best is not None else []


def packed_rest(
    net: Any,
    cache: Any,
    mask: Tensor,
    idx: Tensor,
    comp: Tensor,
    comp_mask: Tensor,
    forward: Any,
) -> tuple[Tensor, Tensor] | None:
    """Run completion tokens 0..len-2 of every sample (the inputs predicting tokens 1..len-1)
    packed into bins after the prompts' cache `cache` (P prompt rows; `mask` (P, L) their mask).
    Returns ((B·C, X) outputs, (n, T-1) long index of each sample position's output, -1 where
    the position is padding), or None when packing saves nothing (as many bins as samples).
    `forward(ids, mask4, pos, cache)` runs the model and returns its (B, C, X) outputs."""
    kind = _attn_kind(net)
    if kind is None:
        return None
    n, t = comp.shape
    need = (comp_mask.long().sum(1) - 1).clamp(min=0).tolist()
    prompt_of = idx.tolist()
    hidden = int(getattr(getattr(net, "config", None), "hidden_size", 0) or 1024)
    groups = best_bins(prompt_of, need, mask.shape[1], hidden)
    if len(groups) >= n or not groups:
        return None
    cap = max(sum(need[i] for i in g) for g in groups)  # the fullest bin's width
    nb = len(groups)
    # the layout is built on the CPU (a few small writes per sample) and moved once
    ids, plen = comp.cpu(), mask.long().sum(1).tolist()
    tok = torch.zeros(nb, cap, dtype=torch.long)
    pos = torch.zeros(nb, cap, dtype=torch.long)
    seg = torch.full((nb, cap), -1, dtype=torch.long)
    where = torch.full((n, max(t - 1, 0)), -1, dtype=torch.long)
    owner = [prompt_of[g[0]] for g in groups]
    for b, rows in enumerate(groups):
        at = 0
        for i in rows:
            k = need[i]
            steps = torch.arange(k)
            tok[b, at : at + k] = ids[i, :k]
            pos[b, at : at + k] = plen[owner[b]] + steps
            seg[b, at : at + k] = i
            where[i, :k] = b * cap + at + steps
            at += k
    dev = comp.device
    tok, pos, seg, where = tok.to(dev), pos.to(dev), seg.to(dev), where.to(dev)
    owner_t = torch.tensor(owner, dtype=torch.long, device=dev)
    causal = torch.ones(cap, cap, dtype=torch.bool, device=dev).tril()
    same = (seg[:, :, None] == seg[:, None, :]) & causal
    return run_bins(net, cache, mask, owner_t, tok, pos, same, kind, forward), where


def run_bins(
    net: Any, cache: Any, mask: Tensor, owner: Tensor, tok: Tensor, pos: Tensor, sees: Tensor,
    kind: str, forward: Any,
) -> Tensor:  # fmt: skip
    """(B·C, X) outputs of the (B, C) bin tokens `tok` at positions `pos`, run after the prompts'
    cache gathered to each bin's prompt `owner[b]`: a bin token attends to its prompt's unmasked
    tokens and to the bin tokens `sees` (B, C, C) marks. `kind` is the mask the attention takes."""
    cap = tok.shape[1]
    cache.batch_select_indices(owner)  # differentiable gather of the prompts' keys and values
    keys = torch.cat([mask.bool()[owner][:, None, :].expand(-1, cap, -1), sees], 2)[:, None]
    if kind == "float":
        dtype = next(net.parameters()).dtype
        keys = torch.zeros(keys.shape, dtype=dtype, device=tok.device).masked_fill(
            ~keys, torch.finfo(dtype).min
        )
    return forward(tok, keys, pos, cache).reshape(tok.numel(), -1)


def gather_rest(first: Tensor, flat: Tensor, where: Tensor) -> Tensor:
    """(n, 1, X) first outputs + packed outputs at `where` (-1: zeros) -> (n, T, X)."""
    zero = flat.new_zeros(1, flat.shape[-1])
    rest = torch.cat([flat, zero])[where.masked_fill(where < 0, flat.shape[0])]
    return torch.cat([first, rest], 1)


def packing_ok(net: Any, check: Any, layout: str = "mask") -> bool:
    """Whether `layout` ("mask" or "position_ids") of packed scoring equals padded scoring for
    `net` (`check(net)` compares them on a small input; computed once per model and layout).
    Any error means no."""
    try:
        return _OK[net][layout]
    except (KeyError, TypeError):
        pass
    ok = False
    if layout == "position_ids" or _attn_kind(net) is not None:
        try:
            ok = bool(check(net))
        except Exception:  # a model that rejects 4D masks or caches: padding is always correct
            ok = False
    with contextlib.suppress(TypeError):
        _OK.setdefault(net, {})[layout] = ok
    return ok


def position_packed(
    call: Any, ids: Tensor, mask: Tensor, idx: Tensor, comp: Tensor, comp_mask: Tensor
) -> Tensor:
    """(P, L) prompts, (n,) prompt row per sample, (n, T) completions -> (n, T, X) outputs at
    the positions predicting each completion token (0 past its end), from ONE row holding each
    sample's prompt tokens then its completion tokens but the last, position ids restarting
    at 0 per sample, no attention mask. Equals the padded full-sequence pass
    (`scoring.completion_outputs` without `share`) where the kernel reads the restarts as
    sequence boundaries (flash: cu_seqlens; sdpa/eager/flex: transformers' packed-sequence
    mask; `packing_ok` checks). `call`: a ModelCall; every prompt has >= 1 token."""
    n, t = comp.shape
    dev = comp.device
    pmask = mask[idx].bool()  # (n, L)
    plen = pmask.sum(1)  # (n,)
    clen = comp_mask.long().sum(1)  # (n,)
    seq = plen + (clen - 1).clamp(min=0)  # (n,): the last completion token predicts nothing
    start = seq.cumsum(0) - seq  # (n,) each sequence's first column in the row
    total, empty = torch.stack([seq.sum(), (plen == 0).sum()]).tolist()  # the one host read
    if empty:
        raise ValueError("position-id packing needs every prompt to hold at least one token")
    steps = torch.arange(t, device=dev)
    p_at = (start[:, None] + pmask.long().cumsum(1) - 1)[pmask]  # (Σ plen,) prompt columns
    cin = steps[None] < (clen - 1)[:, None]  # (n, T) completion tokens run as inputs
    c_at = (start + plen)[:, None] + steps[None]  # (n, T)
    pos = torch.arange(total, device=dev) - start.repeat_interleave(seq, output_size=total)
    outs = steps[None] < clen[:, None]  # (n, T) positions with an output
    o_at = ((start + plen - 1)[:, None] + steps[None])[outs]  # (K,) their columns
    no_mask: Any = None  # the kernel reads the sequence boundaries from the positions
    if isinstance(call, CausalLMCall):  # one vocabulary: one HF call
        tok = torch.zeros(total, dtype=torch.long, device=dev)
        tok[p_at], tok[c_at[cin]] = ids[idx][pmask], comp[cin]
        got = call.forward(tok[None], no_mask, pos[None], None, 0)[0, o_at]  # (K, X)
    else:  # prompt and completion tokens embedded apart (e.g. Janus' image codes)
        e_p = call.embed(ids[idx][pmask][None], False)[0]  # (Σ plen, H)
        e_c = call.embed(comp[cin][None], True)[0]  # (Σ inputs, H)
        embeds = e_p.new_zeros(total, e_p.shape[-1]).index_put((p_at,), e_p)
        embeds = embeds.index_put((c_at[cin],), e_c)  # (S, H)
        hidden = call.run(embeds[None], no_mask, pos[None], None)  # (1, S, H)
        got = call.logits(hidden[:, o_at])[0]  # (K, X)
    out = got.new_zeros(n, t, got.shape[-1])
    out[outs] = got
    return out
