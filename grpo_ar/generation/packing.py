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
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch
from torch import Tensor

_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
MASK_KINDS = {"sdpa": "bool", "eager": "float"}


def _attn_kind(net: Any) -> str | None:
    impl = getattr(getattr(net, "config", None), "_attn_implementation", None)
    return MASK_KINDS.get(impl or "")


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


def packing_ok(net: Any, check: Any) -> bool:
    """Whether packed scoring equals padded scoring for `net` (`check(net)` compares them on a
    small input; computed once per model). Any error means no."""
    try:
        return _OK[net]
    except (KeyError, TypeError):
        pass
    ok = False
    if _attn_kind(net) is not None:
        try:
            ok = bool(check(net))
        except Exception:  # a model that rejects 4D masks or caches: padding is always correct
            ok = False
    with contextlib.suppress(TypeError):
        _OK[net] = ok
    return ok
