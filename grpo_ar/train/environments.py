"""Environments that answer the model: the interface, the `environment` reward, credit
assignment of per-turn rewards and trajectory metrics.

A multi-turn rollout (grpo_ar/generation/multiturn.py) is the whole trajectory after the first
prompt. The environment's tokens stay in it (the model attends to them) but are masked out of the
policy loss, the KL and the entropy: the trainer's loss mask is `Rollout.model_mask`.

Rewards: by default a trajectory is scored once, by the entry's rewards on the decoded output
(the model's last turn, adapters/multiturn.py), where the `environment` reward adds the sum of the
environment's per-turn rewards. With `credit="per_turn"` each turn's tokens are credited with the
turn rewards still to come instead (`core.turns.per_turn_advantages`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core.turns import per_turn_advantages
from ..generation.multiturn import TRUNCATION, TurnLimits
from ..rewards.base import per_sample, register_reward
from ..types import Entry, Rollout

CREDIT = ("final", "per_turn")


@dataclass(frozen=True)
class Observation:
    """What the environment answers to one model turn. Give at most one of `messages` (chat
    messages, rendered with the tokenizer's chat template, e.g. a tool result), `text` (appended
    as is) or `tokens` (token ids appended as is); none of them when `done`."""

    messages: tuple[Mapping[str, Any], ...] = ()
    text: str | None = None
    tokens: tuple[int, ...] | None = None
    reward: float = 0.0
    """Per-turn reward (`data["turn_reward"]`; summed by the `environment` reward)."""
    done: bool = False

    def __post_init__(self) -> None:
        given = [k for k in ("messages", "text", "tokens") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"an Observation takes one of messages, text, tokens; got {given}")


@dataclass
class Environment(ABC):
    """One episode per trajectory: `reset(entry)` -> state, then `step(state, text, tokens)` after
    each model turn. The G trajectories of a prompt share its first prompt, `prompt(entry)`."""

    max_turns: int = 4
    """Model turns per trajectory (one still unfinished after them is truncated)."""
    max_tokens: int = 512
    """Trajectory tokens after the first prompt, the model's and the environment's together."""
    credit: str = "final"
    """"final": the trajectory's rewards give every model token one advantage; "per_turn": each
    turn's tokens add the group-normalised per-turn rewards still to come."""

    def __post_init__(self) -> None:
        TurnLimits(self.max_turns, self.max_tokens)  # validates them
        if self.credit not in CREDIT:
            raise ValueError(f"credit={self.credit!r}; valid: {', '.join(CREDIT)}")

    @property
    def limits(self) -> TurnLimits:
        return TurnLimits(self.max_turns, self.max_tokens)

    def prompt(self, entry: Entry) -> Any:
        """The first prompt (a string or chat messages), the same for the whole group."""
        return entry.prompt

    def tools(self) -> list[dict[str, Any]] | None:
        """JSON schemas of the tools the model may call (for the chat template), or None."""
        return None

    def tool_prompt(self) -> str | None:
        """How to call the tools, for the system message of a chat template that ignores
        `tools=` (None: nothing to add)."""
        return None

    @abstractmethod
    def reset(self, entry: Entry) -> Any:
        """A fresh episode state for one trajectory of `entry`."""

    @abstractmethod
    def step(self, state: Any, text: str, tokens: Sequence[int]) -> Observation:
        """The model's turn (decoded text without special tokens, and its token ids) -> the
        answer. Must not raise: anything that goes wrong is an observation for the model."""

    def step_batch(
        self, states: Sequence[Any], texts: Sequence[str], tokens: Sequence[Sequence[int]]
    ) -> list[Observation]:
        """Every trajectory's step of one turn (override to run them concurrently)."""
        return [self.step(s, x, t) for s, x, t in zip(states, texts, tokens)]

    def stats(self, state: Any) -> Mapping[str, float]:
        """Per-trajectory numbers to log as `env/<name>` means (e.g. tool calls)."""
        return {}


@register_reward("environment")
@per_sample
def environment_reward(output: Any) -> float:
    """The sum of the environment's per-turn rewards of a trajectory (adapters/multiturn.py)."""
    return float(output.env_reward)


def assign_credit(rollout: Rollout, adv: Tensor, group_size: int) -> Tensor:
    """The trainer's (N,) advantages, or (N, T) token advantages where the rollout's environment
    asks for per-turn credit (`rollout.extras["credit"]`)."""
    if rollout.extras.get("credit", "final") != "per_turn":
        return adv
    reward = rollout.data["turn_reward"].to(adv)
    return per_turn_advantages(adv, reward, group_size) * rollout.model_mask.to(adv)


def rollout_sums(rollout: Rollout) -> dict[str, tuple[Tensor, Tensor]]:
    """Trajectory metrics of a multi-turn rollout as (Σ, count) pairs, summed over ranks before
    they are divided (a rank's shard alone is not the batch): turns, the share of environment
    tokens, truncation causes, `env/<stat>` means and the tool metrics. Empty for a single-turn
    rollout."""
    if "model_mask" not in rollout.data:
        return {}
    data = rollout.data
    # kept on the rollout's device: StepStats.summary reads every sum in one transfer
    rows = torch.tensor(float(rollout.completion_ids.shape[0]), device=data["turns"].device)
    per_row = lambda x: (x.float().sum(), rows)  # noqa: E731  (a mean over trajectories)
    tokens = rollout.completion_mask.float().sum()
    out = {
        "turns/mean": per_row(data["turns"]),
        "turns/env_token_frac": (tokens - rollout.model_mask.float().sum(), tokens),
    }
    for name, code in TRUNCATION.items():
        if code:
            out[f"turns/truncated_{name}"] = per_row(data["truncation"] == code)
    for key, value in data.items():
        if key.startswith("env/"):
            out[key] = per_row(value)
    if "env/tool_calls" in data:  # TRL's names: calls per trajectory, failed share of calls
        calls, failed = data["env/tool_calls"].sum(), data["env/tool_failures"].sum()
        out["tools/call_frequency"] = per_row(data["env/tool_calls"])
        out["tools/failure_frequency"] = (failed.float(), calls.float())
    return out


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    """`rollout_sums` of one process's rollout as means (an empty count gives 0)."""
    return {k: float(s / n.clamp(min=1)) for k, (s, n) in rollout_sums(rollout).items()}


def stats_tensors(stats: Sequence[Mapping[str, float]], device: Any) -> dict[str, Tensor]:
    """Per-trajectory `Environment.stats` -> `data["env/<name>"]` (N,) tensors (0 if missing)."""
    names = sorted({k for s in stats for k in s})
    return {
        f"env/{k}": torch.tensor([float(s.get(k, 0.0)) for s in stats], device=device)
        for k in names
    }
