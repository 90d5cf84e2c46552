"""DAPO's dynamic sampling (arXiv 2503.14476 §3.2) over any sampler."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..rewards.base import RewardResult
from ..types import Rollout
from .batching import concat_results, concat_rollouts, keep_groups
from .step import zero_std_groups


def fill_batch(
    rollout: Rollout,
    result: RewardResult,
    group_size: int,
    max_rounds: int,
    draw: Callable[[], tuple[Rollout, RewardResult]],
    pad: int,
) -> tuple[Rollout, RewardResult, dict[str, float]]:
    """Keep groups whose rewards differ; `draw()` more (a fresh prompt batch, sampled and
    scored) until the batch is full or `max_rounds` rounds are spent; then fill up with the
    dropped groups, newest first (zero advantage, so the batch shape and the loss normalisers
    stay fixed). Returns the joined rollout, its reward result and the round statistics."""
    device, first_extras = rollout.completion_ids.device, dict(rollout.extras)
    need, kept, dropped, n_kept, rounds = len(rollout.prompts), [], [], 0, 1
    while True:
        flat = zero_std_groups(result.total, group_size)
        ok, bad = (~flat).nonzero().flatten(), flat.nonzero().flatten()
        take = ok[: need - n_kept]
        if len(take):
            kept.append(keep_groups(rollout, result, take.to(device)))
            n_kept += len(take)
        if len(bad):
            dropped.append(keep_groups(rollout, result, bad.to(device)))
        if n_kept >= need or rounds >= max_rounds:
            break
        rollout, result = draw()
        rounds += 1
    filled = 0
    for sub, res in reversed(dropped):
        if n_kept + filled >= need:
            break
        k = min(need - n_kept - filled, len(sub) // group_size)
        kept.append(keep_groups(sub, res, torch.arange(k, device=device)))
        filled += k
    joined = concat_rollouts([r for r, _ in kept], pad)
    # what the sampler recorded besides outputs (e.g. the CFG scale the adapter checks)
    joined.extras = {k: v for k, v in first_extras.items() if k != "outputs"}
    joined.extras["outputs"] = [o for r, _ in kept for o in r.extras["outputs"]]
    stats = {"dynamic/rounds": rounds, "dynamic/kept": n_kept / need, "dynamic/filled": filled}
    return joined, concat_results([res for _, res in kept]), stats
