"""The shared data contract: Entry (prompt + rewards), PromptBatch and Rollout (what adapters hand
the trainer, for every modality).

Prompts are stored once per prompt (P rows, left-padded); the N = P·G samples point at their
prompt through `prompt_index`. Groups are contiguous: samples g·G … g·G + G - 1 share a prompt.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class RewardSpec:
    """One reward an entry asks for: registry name, weight in the sum, per-entry arguments."""

    name: str
    weight: float = 1.0
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Entry:
    """One prompt and how to score what the model makes of it.

    `prompt` is a string, chat messages (`[{"role": ..., "content": ...}]`), or whatever the
    modality adapter encodes (e.g. a class id for an image model).
    """

    prompt: Any
    rewards: tuple[RewardSpec, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class PromptBatch:
    """P encoded prompts, left-padded. `uncond_*` hold the CFG unconditional prompts where used."""

    input_ids: Tensor  # (P, L) long
    attention_mask: Tensor  # (P, L) long, 0 on left padding
    entries: list[Entry]
    uncond_input_ids: Tensor | None = None  # (P, Lu)
    uncond_attention_mask: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.input_ids.shape != self.attention_mask.shape:
            raise ValueError(
                f"input_ids {tuple(self.input_ids.shape)} and attention_mask "
                f"{tuple(self.attention_mask.shape)} differ"
            )
        if len(self.entries) != self.input_ids.shape[0]:
            raise ValueError(
                f"{len(self.entries)} entries for {self.input_ids.shape[0]} prompt rows"
            )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: Tensor) -> PromptBatch:
        """Rows `rows` (long), with left padding shared by all of them trimmed."""

        def trim(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
            ids, mask = ids[rows], mask[rows]
            keep = int(mask.sum(0).nonzero()[0]) if mask.any() else mask.shape[1] - 1
            return ids[:, keep:], mask[:, keep:]

        ids, mask = trim(self.input_ids, self.attention_mask)
        uids, umask = self.uncond_input_ids, self.uncond_attention_mask
        if uids is not None and umask is not None:
            uids, umask = trim(uids, umask)
        entries = [self.entries[int(i)] for i in rows]
        return replace(
            self,
            input_ids=ids,
            attention_mask=mask,
            entries=entries,
            uncond_input_ids=uids,
            uncond_attention_mask=umask,
        )

    def to(self, device: torch.device | str) -> PromptBatch:
        """The same prompts with every tensor on `device`."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            uncond_input_ids=move(self.uncond_input_ids),
            uncond_attention_mask=move(self.uncond_attention_mask),
        )


@dataclass
class Rollout:
    """N sampled completions (T tokens, right-padded after EOS) of P prompts, G per prompt.

    `sampling_logp` is the sampler's own log-prob of each chosen token under the distribution it
    sampled from, so any gap to the trained distribution can be importance-corrected.
    `data` holds further per-sample tensors (advantages, reference log-probs, ...) whose first
    dim is N; `select` slices them along with everything else.
    """

    prompts: PromptBatch
    group_size: int
    completion_ids: Tensor  # (N, T) long, pad after EOS
    completion_mask: Tensor  # (N, T) float, 1 up to and including EOS
    sampling_logp: Tensor  # (N, T) float, 0 under mask == 0
    truncated: Tensor  # (N,) bool, no EOS within the budget
    prompt_index: Tensor  # (N,) long, row of `prompts`
    group_ids: Tensor  # (N,) long, group index in the whole step batch
    span_ids: Tensor | None = None  # (N, T) long token span type (e.g. text then image codes)
    data: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def entries(self) -> list[Entry]:
        """The entry of each sample (N,)."""
        return [self.prompts.entries[int(i)] for i in self.prompt_index]

    @property
    def model_mask(self) -> Tensor:
        """(N, T) float: 1 on the tokens the model sampled, the ones the loss, KL and entropy
        see. A multi-turn rollout's environment tokens are in `completion_mask` (attended) but
        not here (`data["model_mask"]`, grpo_ar/generation/multiturn.py)."""
        mask = self.data.get("model_mask")
        return self.completion_mask if mask is None else mask

    @property
    def lengths(self) -> Tensor:
        """(N,) completion lengths in tokens."""
        return self.completion_mask.sum(-1).long()

    def select(self, rows: Tensor | list[int]) -> Rollout:
        """Sub-rollout of samples `rows`, with its prompts and padding columns trimmed."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.completion_ids.device)
        used, local = torch.unique(self.prompt_index[rows], return_inverse=True)
        t = int(self.completion_mask[rows].sum(-1).max().clamp(min=1))
        width = self.completion_ids.shape[1]

        def cut(x: Tensor) -> Tensor:
            x = x[rows]
            return x[:, :t] if x.ndim >= 2 and x.shape[1] == width else x

        return replace(
            self,
            prompts=self.prompts.select(used),
            completion_ids=cut(self.completion_ids),
            completion_mask=cut(self.completion_mask),
            sampling_logp=cut(self.sampling_logp),
            truncated=self.truncated[rows],
            prompt_index=local,
            group_ids=self.group_ids[rows],
            span_ids=None if self.span_ids is None else cut(self.span_ids),
            data={k: cut(v) for k, v in self.data.items()},
        )

    def micro_batches(self, n: int, token_budget: int | None = None) -> list[Rollout]:
        """Split into n contiguous micro-batches of whole groups where possible.

        With `token_budget`, n is ignored: whole groups, longest completions first, are packed
        into as few micro-batches as keep rows x (prompt width + completion width) <= budget
        after each micro-batch's padding is trimmed (a group over the budget alone is split by
        rows). The loss is unchanged: aggregations take global token counts.
        """
        if token_budget is not None:
            return [self.select(rows) for rows in self._pack(token_budget)]
        groups = len(self) // self.group_size
        if n <= groups and groups % n == 0:
            per = (groups // n) * self.group_size
        elif len(self) % n == 0:
            per = len(self) // n
        else:
            raise ValueError(f"{len(self)} samples do not split into {n} micro-batches")
        return [self.select(list(range(i, i + per))) for i in range(0, len(self), per)]

    def _pack(self, budget: int) -> list[list[int]]:
        """Row lists of token-budget micro-batches (greedy first fit over groups by length)."""
        if budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {budget}")
        lengths = self.completion_mask.sum(-1).long().clamp(min=1).tolist()
        widths = self.prompts.attention_mask.sum(-1).long().tolist()  # real prompt tokens
        prompt_of = self.prompt_index.tolist()
        groups: dict[int, list[int]] = {}
        for row, g in enumerate(self.group_ids.tolist()):
            groups.setdefault(g, []).append(row)
        order = sorted(groups.values(), key=lambda rows: -max(lengths[r] for r in rows))

        def cost(rows: list[int]) -> int:
            width = max(widths[prompt_of[r]] for r in rows) + max(lengths[r] for r in rows)
            return len(rows) * width

        batches: list[list[int]] = []
        cur: list[int] = []
        for rows in order:
            if cur and cost(cur + rows) > budget:
                batches, cur = batches + [cur], []
            if cost(rows) <= budget:
                cur = cur + rows
                continue
            for row in rows:  # a group over the budget alone: split it by rows
                if cur and cost(cur + [row]) > budget:
                    batches, cur = batches + [cur], []
                cur = cur + [row]
        return batches + [cur] if cur else batches
