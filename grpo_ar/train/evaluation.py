"""Held-out scoring: mean reward (overall and per reward) of greedy or sampled outputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..adapters.base import Adapter
from ..rewards import RewardComputer, RewardContext
from ..types import Entry, Rollout


def reward_context(adapter: Adapter, rollout: Rollout, group_size: int, step: int) -> RewardContext:
    """What rewards may know about a decoded rollout beyond its outputs."""
    return RewardContext(
        rollout.entries,
        rollout.group_ids.tolist(),
        group_size,
        step,
        lengths=adapter.output_lengths(rollout),
    )


def eval_generator_seeds(seed: int, n_entries: int, batch_size: int) -> list[int]:
    """The generator seeds `evaluate_rewards(seed=seed)` draws from over `n_entries` entries in
    batches of `batch_size`: one per batch, seed + 7919 + the batch's offset (an evaluation
    seed's draws must not be a training stream: examples/ar_common/seeds.py checks them)."""
    return [seed + 7919 + i for i in range(0, n_entries, batch_size)]


@torch.no_grad()
def evaluate_rewards(
    model: torch.nn.Module,
    adapter: Adapter,
    rewards: RewardComputer,
    entries: Sequence[Entry],
    *,
    greedy: bool = True,
    samples: int = 1,
    batch_size: int = 16,
    seed: int = 0,
    step: int = 0,
    per_output: list[dict[str, float]] | None = None,
) -> dict[str, float]:
    """`eval/{greedy|sampled}/reward` and `eval/.../<reward name>` over `entries`, `samples`
    outputs per prompt; each batch draws from its own generator (seed + 7919 + offset), so a
    score does not depend on what ran before it. `per_output`, when given, receives each
    output's {"reward": total, <reward name>: value}, entry-major (an entry's samples in a row)."""
    device = next(model.parameters()).device
    model.eval()
    totals: list[Tensor] = []
    comps: dict[str, list[Tensor]] = {}
    draws = eval_generator_seeds(seed, len(entries), batch_size)
    for i, draw in zip(range(0, len(entries), batch_size), draws):
        chunk = list(entries[i : i + batch_size])
        prompts = adapter.encode(chunk).to(device)
        gen = torch.Generator(device=device).manual_seed(draw)
        rollout = adapter.sample(model, prompts, samples, generator=gen, greedy=greedy)
        result = rewards(adapter.decode(rollout), reward_context(adapter, rollout, samples, step))
        totals.append(result.total)
        if per_output is not None:
            per_output += [
                {"reward": float(t), **dict(zip(result.names, map(float, row)))}
                for t, row in zip(result.total, result.components)
            ]
        for k, name in enumerate(result.names):
            comps.setdefault(name, []).append(result.components[:, k])
    mode = "greedy" if greedy else "sampled"
    out = {f"eval/{mode}/reward": float(torch.cat(totals).nanmean())}
    out.update({f"eval/{mode}/{k}": float(torch.cat(v).nanmean()) for k, v in comps.items()})
    return out
