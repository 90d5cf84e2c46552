"""Tree sampling (TGTS, KGen; TreePO arXiv 2508.17445 §3): a prompt's G completions are the
leaves of trees whose nodes are token segments. A segment ends after `segment_tokens` tokens or
at a separator token; it then forks into `branching` children, which continue from copies of
its KV cache rows (`Decoder.select` with repeated rows: no recompute of the shared prefix),
(with `fork_entropy`, a row also forks right before drawing a token whose distribution's
entropy exceeds it, so its children differ at that uncertain token)
until `depth` forks have happened. A row that ends (EOS or budget) before its last fork stands
for all the leaves it would have had: it is repeated branching**(forks left) times.

Each leaf is still a sample of the policy (its tokens are drawn one by one from the same
transform as `sampler.sample`, and `sampling_logp` is their log-prob under it); leaves of one
tree are correlated, which TreePO's sub-group advantage (core/tree_advantages.py) uses.

What the rollout records: `data["tree_segments"]` (N, T) the segment id of every completion
token (-1 on padding), `extras["tree_parent"]` (S,) the parent segment of each segment (-1 for
roots), `data["tree_subgroups"]` (N, K) the sub-groups of each leaf for the advantage (column 0
the prompt, then the leaf's ancestor segments that fork; -1 = none), and
`extras["tree_stats"]`: decoded row-steps (model tokens computed after the prompt) and segments.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..types import PromptBatch, Rollout
from .decode_step import Decoder
from .params import SamplingParams, allowed_mask, position_masks, transform_logits
from .sampler import Draw, finish_rollout


class Segments:
    """The forest of one call: parent and depth of every segment, created in order."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.depth: list[int] = []

    def new(self, parents: list[int], depths: list[int]) -> list[int]:
        first = len(self.parent)
        self.parent += parents
        self.depth += depths
        return list(range(first, len(self.parent)))


@torch.no_grad()
def tree_sample(
    model: Any, prompts: PromptBatch, group_size: int, params: SamplingParams,
    generator: torch.Generator | None = None, fast: bool = True,
) -> Rollout:  # fmt: skip
    """G leaves per prompt sampled as trees (see the module docstring); groups contiguous."""
    tree = params.tree
    if params.uses_cfg:
        raise ValueError("sampling.tree does not support cfg_scale != 1; set one of them off")
    roots, b, depth_max = tree.roots(group_size), tree.branching, tree.depth
    dec = Decoder(model, params, True, fast)
    logits = dec.prefill(prompts.input_ids, prompts.attention_mask, roots, True)  # (P·roots, V)
    device, r = logits.device, logits.shape[0]
    allowed = allowed_mask(params, logits.shape[-1], device)
    per_pos = position_masks(params, logits.shape[-1], device)
    eos = torch.tensor(params.eos_token_ids, dtype=torch.long, device=device)
    seps = torch.tensor(tree.separator_ids, dtype=torch.long, device=device)
    segs = Segments()
    width = params.max_new_tokens
    lp_dtype = torch.promote_types(logits.dtype, torch.float32)
    # running rows: prompt, forks so far, tokens in the current segment, current segment
    st = {
        "prompt": torch.arange(len(prompts), device=device).repeat_interleave(roots),
        "depth": torch.zeros(r, dtype=torch.long, device=device),
        "seg_len": torch.zeros(r, dtype=torch.long, device=device),
        "seg": torch.tensor(segs.new([-1] * r, [0] * r), dtype=torch.long, device=device),
        "tokens": torch.full((r, width), params.pad_token_id, dtype=torch.long, device=device),
        "logp": torch.zeros(r, width, dtype=lp_dtype, device=device),
        "segs": torch.full((r, width), -1, dtype=torch.long, device=device),
    }
    done: list[dict[str, Tensor]] = []
    decoded = 0  # row-steps the model ran after the prompt (one token each)
    for t in range(width):
        decoded += st["prompt"].shape[0]
        at = allowed if per_pos is None else per_pos[0][per_pos[1][t]]
        z = transform_logits(logits, params, at, True, t < params.min_new_tokens)
        if tree.fork_entropy > 0:  # fork before drawing an uncertain token (TreePO §3.2)
            now = (entropy(z) > tree.fork_entropy) & (st["depth"] < depth_max)
            if bool(now.any()):
                idx = _next_rows(torch.zeros_like(now), now, b)
                st = _children({k: v[idx] for k, v in st.items()}, now[idx], segs)
                z = z[idx]
                dec.select(idx)
        tok, lp = Draw(z.shape[0], generator, False)(z, None)
        st["tokens"][:, t], st["logp"][:, t], st["segs"][:, t] = tok, lp, st["seg"]
        st["seg_len"] += 1
        ended = torch.isin(tok, eos) | (t == width - 1)
        boundary = torch.isin(tok, seps)
        if tree.segment_tokens:
            boundary |= st["seg_len"] >= tree.segment_tokens
        fork = ~ended & boundary & (st["depth"] < depth_max)
        if bool(ended.any()):
            done.append({k: v[ended] for k, v in st.items()})
        if bool(ended.all()):
            break
        idx = _next_rows(ended, fork, b)
        st = {k: v[idx] for k, v in st.items()}
        if bool(fork.any()):
            st = _children(st, fork[idx], segs)
        dec.select(idx)
        logits = dec.step(tok[idx])
    return _leaves(prompts, group_size, params, done, segs, b, depth_max, roots, eos, decoded)


def _children(st: dict[str, Tensor], children: Tensor, segs: Segments) -> dict[str, Tensor]:
    """Rows `children` (copies of a forking row) each start a new segment under the row's one."""
    parents = st["seg"][children].tolist()
    depth = (st["depth"][children] + 1).tolist()
    st["seg"][children] = torch.tensor(segs.new(parents, depth), device=children.device)
    st["depth"][children] += 1
    st["seg_len"][children] = 0
    return st


def entropy(z: Tensor) -> Tensor:
    """(R, V) logits (-inf allowed) -> (R,) entropy in nats of their softmax."""
    logp = torch.log_softmax(z.float(), -1)
    return -torch.where(logp > float("-inf"), logp.exp() * logp, torch.zeros_like(logp)).sum(-1)


def _next_rows(ended: Tensor, fork: Tensor, b: int) -> Tensor:
    """Row indices of the next step: ended rows leave, forking rows appear b times in a row."""
    copies = torch.where(fork, b, 1).masked_fill(ended, 0)  # (R,)
    return torch.arange(ended.shape[0], device=ended.device).repeat_interleave(copies)


def _leaves(
    prompts: PromptBatch, g: int, params: SamplingParams, done: list[dict[str, Tensor]],
    segs: Segments, b: int, depth_max: int, roots: int, eos: Tensor, decoded: int,
) -> Rollout:  # fmt: skip
    """Finished rows -> G leaves per prompt (an early row repeated for its missing forks),
    groups contiguous, in the order rows finished; plus the tree's records."""
    rows = {k: torch.cat([d[k] for d in done]) for k in done[0]}
    copies = b ** (depth_max - rows["depth"])  # (R,) leaves each finished row stands for
    order = torch.sort(rows["prompt"], stable=True).indices
    idx = order.repeat_interleave(copies[order])
    leaves = {k: v[idx] for k, v in rows.items()}
    if leaves["tokens"].shape[0] != len(prompts) * g:  # an invariant of the fork rule
        raise RuntimeError(f"tree sampling made {leaves['tokens'].shape[0]} leaves, not P·G")
    width = int((leaves["segs"] >= 0).sum(1).max())
    rollout = finish_rollout(
        prompts, g, leaves["tokens"][:, :width], leaves["logp"][:, :width], eos,
        params.pad_token_id,
    )  # fmt: skip
    seg_ids = leaves["segs"][:, :width].masked_fill(rollout.completion_mask == 0, -1)
    parent = torch.tensor(segs.parent, dtype=torch.long)
    rollout.data["tree_segments"] = seg_ids
    rollout.data["tree_subgroups"] = subgroups(leaves["seg"], leaves["prompt"], parent, roots)
    rollout.extras["tree_parent"] = parent
    real = rollout.completion_mask.sum().item()
    rollout.extras["tree_stats"] = {
        "decoded_tokens": decoded, "segments": len(segs.parent), "leaf_tokens": real,
    }  # fmt: skip
    return rollout


def subgroups(leaf_seg: Tensor, prompt: Tensor, parent: Tensor, roots: int) -> Tensor:
    """(N,) last segment and prompt of each leaf -> (N, K) sub-group ids for the advantage:
    column 0 the prompt, then each ancestor segment that forked (root first); a root is left
    out when it is the prompt's only one (same leaves as column 0). -1 pads shorter paths."""
    paths = []
    for s in leaf_seg.tolist():
        path = []
        s = int(parent[s])  # the leaf's own segment: its leaves (copies) all share one reward
        while s >= 0:
            path.append(s)
            s = int(parent[s])
        path.reverse()
        paths.append(path[1:] if roots == 1 else path)
    k = max(map(len, paths), default=0)
    n_prompts = int(prompt.max()) + 1 if prompt.numel() else 0
    cols = [[-1] * (k + 1) for _ in paths]
    for row, (p, path) in enumerate(zip(prompt.tolist(), paths)):
        cols[row][0] = p
        for j, s in enumerate(path):
            cols[row][j + 1] = n_prompts + s  # segment ids after the prompt ids: one id space
    return torch.tensor(cols, dtype=torch.long, device=leaf_seg.device)
