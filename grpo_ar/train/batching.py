"""Joining rollouts of several sampling rounds into one step batch (DAPO dynamic sampling).

Prompts stay left-padded and completions right-padded; group ids and prompt indices are
renumbered so groups stay contiguous and in order.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from ..rewards.base import RewardResult
from ..types import PromptBatch, Rollout


def _pad_cat(xs: list[Tensor], value: float, left: bool = False) -> Tensor:
    """Concatenate along dim 0, padding dim 1 (if any) to the widest with `value`."""
    if xs[0].ndim < 2:
        return torch.cat(xs)
    width = max(x.shape[1] for x in xs)
    out = []
    for x in xs:
        pad = x.new_full((x.shape[0], width - x.shape[1], *x.shape[2:]), value)
        out.append(torch.cat([pad, x] if left else [x, pad], 1))
    return torch.cat(out)


def concat_prompts(batches: list[PromptBatch], pad_id: int = 0) -> PromptBatch:
    """P1 + P2 + … prompts, left padding widened to the longest."""

    def both(a: str) -> Tensor | None:
        xs = [getattr(b, a) for b in batches]
        if any(x is None for x in xs):
            if not all(x is None for x in xs):
                raise ValueError(f"cannot join prompt batches where only some have {a}")
            return None
        return _pad_cat(xs, pad_id if "ids" in a else 0, left=True)

    return replace(
        batches[0],
        input_ids=_pad_cat([b.input_ids for b in batches], pad_id, left=True),
        attention_mask=_pad_cat([b.attention_mask for b in batches], 0, left=True),
        uncond_input_ids=both("uncond_input_ids"),
        uncond_attention_mask=both("uncond_attention_mask"),
        entries=[e for b in batches for e in b.entries],
    )


def concat_rollouts(rollouts: list[Rollout], pad_id: int = 0) -> Rollout:
    """One rollout of all samples, groups renumbered 0…; `data` keys must agree."""
    g = rollouts[0].group_size
    if any(r.group_size != g for r in rollouts):
        raise ValueError("cannot join rollouts of different group sizes")
    offsets = torch.tensor([0] + [len(r.prompts) for r in rollouts[:-1]]).cumsum(0)
    n = sum(len(r) for r in rollouts)
    device = rollouts[0].completion_ids.device
    spans = [r.span_ids for r in rollouts if r.span_ids is not None]
    return replace(
        rollouts[0],
        prompts=concat_prompts([r.prompts for r in rollouts], pad_id),
        completion_ids=_pad_cat([r.completion_ids for r in rollouts], pad_id),
        completion_mask=_pad_cat([r.completion_mask for r in rollouts], 0),
        sampling_logp=_pad_cat([r.sampling_logp for r in rollouts], 0),
        truncated=torch.cat([r.truncated for r in rollouts]),
        prompt_index=torch.cat([r.prompt_index + o for r, o in zip(rollouts, offsets.tolist())]),
        group_ids=torch.arange(n, device=device) // g,
        span_ids=_pad_cat(spans, 0) if len(spans) == len(rollouts) else None,
        data={k: _pad_cat([r.data[k] for r in rollouts], 0) for k in rollouts[0].data},
        extras={},
    )


def concat_results(results: list[RewardResult]) -> RewardResult:
    """Reward results of several batches; a reward missing from a batch is unused there."""
    names: list[str] = []
    for r in results:
        names += [n for n in r.names if n not in names]
    k = len(names)

    def spread(r: RewardResult, x: Tensor, fill: float | bool) -> Tensor:
        out = x.new_full((x.shape[0], k), fill)
        for j, name in enumerate(r.names):
            out[:, names.index(name)] = x[:, j]
        return out

    failures: dict[str, int] = {}
    for r in results:
        for name, c in r.failures.items():
            failures[name] = failures.get(name, 0) + c
    return RewardResult(
        total=torch.cat([r.total for r in results]),
        components=torch.cat([spread(r, r.components, float("nan")) for r in results]),
        weights=torch.cat([spread(r, r.weights, 0.0) for r in results]),
        used=torch.cat([spread(r, r.used, False) for r in results]),
        names=names,
        failures=failures,
    )


def keep_groups(
    rollout: Rollout, result: RewardResult, groups: Tensor
) -> tuple[Rollout, RewardResult]:
    """The samples of groups `groups` (long, (k,)) of a rollout and its reward result."""
    g = rollout.group_size
    rows = (groups[:, None] * g + torch.arange(g, device=groups.device)).flatten()
    sub = rollout.select(rows)
    cpu = rows.cpu()
    res = replace(
        result,
        total=result.total[cpu],
        components=result.components[cpu],
        weights=result.weights[cpu],
        used=result.used[cpu],
    )
    outputs = rollout.extras.get("outputs")
    sub.extras = {}  # `select` shares the parent's extras dict: never write through it
    if outputs is not None:
        sub.extras["outputs"] = [outputs[int(i)] for i in cpu]
    return sub, res
