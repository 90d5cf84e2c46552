"""Teacher-forced scoring of a tree rollout with every shared prefix computed once.

Tree-sampled leaves (generation/tree.py) share segments: leaf i's token t is token
(`tree_segments[i, t]`, t) of its prompt's forest. The unique tokens of a prompt are laid out in
one row after the prompt's KV cache (as `packing.packed_rest` lays out completions), with a 4D
mask under which a token sees the prompt and exactly the tokens on its own path: token b is on
a's path when every leaf through a also runs through b, at an earlier or equal position.
Positions are the prompt length + t, as in the sampler. Each leaf's outputs are then gathered
from its path's tokens (`packing.gather_rest`): the same values as scoring every leaf on its own
(the padded path, which it is tested against), and the gradient of a shared token sums over the
leaves through it, as it would there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .packing import MASK_KINDS, run_bins


def tree_layout(
    idx: Tensor, segs: Tensor, comp_mask: Tensor
) -> tuple[list[list[tuple[int, int]]], Tensor]:
    """(n,) prompt row per leaf, (n, T) segment ids, mask -> per prompt row (in order of first
    appearance) its unique tokens (segment, t) for t < len - 1 (the inputs that predict tokens
    1..len-1), sorted by t; and (n, T-1) the flat index (row · width + column) of each leaf
    position's input, -1 where it is padding. The width is the longest row."""
    n, t = segs.shape
    need = (comp_mask.long().sum(1) - 1).clamp(min=0).tolist()
    rows: dict[int, dict[tuple[int, int], int]] = {}
    seg_l, idx_l = segs.tolist(), idx.tolist()
    for i in range(n):
        row = rows.setdefault(idx_l[i], {})
        for k in range(need[i]):
            row.setdefault((seg_l[i][k], k), len(row))
    order = {p: sorted(toks, key=lambda st: (st[1], toks[st])) for p, toks in rows.items()}
    col = {p: {st: c for c, st in enumerate(toks)} for p, toks in order.items()}
    row_of = {p: r for r, p in enumerate(order)}
    width = max((len(v) for v in order.values()), default=0)
    where = torch.full((n, max(t - 1, 0)), -1, dtype=torch.long)
    for i in range(n):
        p = idx_l[i]
        for k in range(need[i]):
            where[i, k] = row_of[p] * width + col[p][(seg_l[i][k], k)]
    return list(order.values()), where.to(segs.device)


def tree_rest(
    net: Any, cache: Any, mask: Tensor, idx: Tensor, comp: Tensor, comp_mask: Tensor,
    segs: Tensor, forward: Any,
) -> tuple[Tensor, Tensor] | None:  # fmt: skip
    """`packing.packed_rest` for a tree rollout: ((B·C, X) outputs, (n, T-1) index of each leaf
    position's output, -1 on padding), or None when the model takes no 4D mask."""
    kind = MASK_KINDS.get(getattr(getattr(net, "config", None), "_attn_implementation", "") or "")
    if kind is None or comp.shape[1] < 2:
        return None
    rows, where = tree_layout(idx, segs, comp_mask)
    if not rows or not any(rows):
        return None
    nb, cap = len(rows), max(len(r) for r in rows)
    dev, plen = comp.device, mask.long().sum(1)
    owner = torch.tensor(list(dict.fromkeys(idx.tolist())), device=dev)  # tree_layout's order
    tok = torch.zeros(nb, cap, dtype=torch.long, device=dev)
    pos = torch.zeros(nb, cap, dtype=torch.long, device=dev)
    sees = torch.zeros(nb, cap, cap, dtype=torch.bool, device=dev)
    for b, toks in enumerate(rows):
        if not toks:  # every leaf of this prompt is one token long: nothing to run
            continue
        leaves = (idx == owner[b]).nonzero().squeeze(-1)  # (n_b,)
        s = torch.tensor([st[0] for st in toks], dtype=torch.long, device=dev)
        t = torch.tensor([st[1] for st in toks], dtype=torch.long, device=dev)
        through = segs[leaves][:, t] == s[None]  # (n_b, U): leaf runs through token u
        tok[b, : len(toks)] = comp[leaves[through.float().argmax(0)], t]
        pos[b, : len(toks)] = plen[owner[b]] + t
        on_path = ~(through[:, :, None] & ~through[:, None, :]).any(0)  # (U, U): a sees b
        sees[b, : len(toks), : len(toks)] = on_path & (t[None, :] <= t[:, None])
    return run_bins(net, cache, mask, owner, tok, pos, sees, kind, forward), where
