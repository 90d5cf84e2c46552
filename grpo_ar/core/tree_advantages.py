"""TreePO's sub-group advantage for tree-sampled groups (generation/tree.py).

TreePO (arXiv 2508.17445 §3.3, Fig. 3): each leaf (completion) belongs to nested sub-groups,
one per node on its path (the prompt, then each ancestor segment that forked); its advantage
is the mean over those sub-groups of its GRPO advantage inside the sub-group. A leaf thus
gains from beating its cousins that share its prefix, not only the whole group: finer credit
for the later segments.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .advantages import ADVANTAGES

TREEPO_SCALES = ("group", "none")


@ADVANTAGES.register("treepo")
def treepo(
    rewards: Tensor,
    valid: Tensor,
    group_size: int,
    *,
    subgroups: Tensor | None = None,
    eps: float = 1e-4,
    scale: str = "group",
) -> Tensor:
    """(N,) rewards, (N, K) sub-group ids (-1 = none; the sampler's `tree_subgroups`) ->
    (N,) mean over the leaf's sub-groups of (r - mean_s) / (std_s + eps) (`scale="none"`:
    r - mean_s). Statistics run over the valid members of a sub-group; a sub-group with < 2 valid
    members is left out of the mean, one whose rewards are all equal contributes 0. Ids are
    matched within a group only (groups contiguous), so batches joined from several sampling
    calls cannot mix trees. Without `subgroups` (flat sampling) this is `grpo`."""
    if scale not in TREEPO_SCALES:
        raise ValueError(f"treepo scale={scale!r}: use 'group' or 'none'")
    n = rewards.shape[0]
    group = torch.arange(n, device=rewards.device) // group_size  # (N,)
    ids = group[:, None] if subgroups is None else subgroups.to(rewards.device)  # (N, K)
    if ids.ndim != 2 or ids.shape[0] != n:
        raise ValueError(f"treepo: subgroups must be (N, K) with N = {n}, got {tuple(ids.shape)}")
    k = ids.shape[1]
    member = (ids >= 0) & valid[:, None]  # (N, K)
    # one key per (group, column, id): dense sub-group index of every (leaf, column)
    col = torch.arange(k, device=ids.device).expand(n, k)
    key = torch.stack([group[:, None].expand(n, k), col, ids.clamp(min=0)], -1).reshape(n * k, 3)
    _, sub = torch.unique(key, dim=0, return_inverse=True)  # (N·K,)
    s = int(sub.max()) + 1 if sub.numel() else 0
    w = member.reshape(-1).to(rewards.dtype)  # (N·K,)
    r = rewards[:, None].expand(n, k).reshape(-1)  # (N·K,)
    cnt = torch.zeros(s, dtype=rewards.dtype, device=rewards.device).index_add_(0, sub, w)
    tot = torch.zeros_like(cnt).index_add_(0, sub, w * r)
    mean = (tot / cnt.clamp(min=1))[sub]
    dev = (r - mean) * w
    var = torch.zeros_like(cnt).index_add_(0, sub, dev**2) / (cnt - 1).clamp(min=1)
    big = torch.finfo(rewards.dtype).max
    hi = torch.full_like(cnt, -big).scatter_reduce_(0, sub, torch.where(w > 0, r, -big), "amax")
    lo = torch.full_like(cnt, big).scatter_reduce_(0, sub, torch.where(w > 0, r, big), "amin")
    counted = (w > 0) & (cnt[sub] >= 2)  # the sub-groups this leaf averages over
    flat = (hi <= lo)[sub]  # exact: a mean of equal floats need not equal them
    adv = dev if scale == "none" else dev / (var.sqrt()[sub] + eps)
    adv = torch.where(counted & ~flat, adv, torch.zeros_like(adv)).reshape(n, k)
    used = counted.reshape(n, k).sum(1)
    out = adv.sum(1) / used.clamp(min=1).to(rewards.dtype)
    return torch.where(valid, out, torch.zeros_like(out))
