"""The adapter contract: the public API for a modality.

The trainer calls only `encode`, `sample`, `token_logprobs` and `decode`. A new modality is a
subclass that implements `encode` and `decode`; sampling and teacher-forced log-probs come from
the shared KV-cached sampler, under one logits transform, so that `token_logprobs` on a sampled
rollout equals the rollout's `sampling_logp` (the invariant the trainer relies on).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from grpo_ar.generation.params import SamplingParams
from grpo_ar.generation.sampler import sample
from grpo_ar.generation.scoring import token_logprobs
from grpo_ar.generation.spans import span_logprobs, span_sample
from grpo_ar.generation.tree import tree_sample
from grpo_ar.types import Entry, PromptBatch, Rollout


class Adapter(ABC):
    """Entries -> prompt tokens -> sampled groups -> decoded outputs, for one modality."""

    def __init__(self, sampling: SamplingParams) -> None:
        self.sampling = sampling

    @abstractmethod
    def encode(self, entries: Sequence[Entry]) -> PromptBatch:
        """Entries -> left-padded prompt token ids (and CFG-unconditional prompts where used)."""

    @abstractmethod
    def decode(self, rollout: Rollout) -> list[Any]:
        """Completion tokens -> what rewards read (str, PIL image, frames), one per sample (N)."""

    def sample(
        self,
        model: Any,
        prompts: PromptBatch,
        group_size: int,
        generator: torch.Generator | None = None,
        greedy: bool = False,
    ) -> Rollout:
        """G completions per prompt, groups contiguous, with the sampler's log-probs recorded
        (as trees of shared segments under `[sampling.tree]`; greedy runs, and a group size the
        tree's leaves cannot fill, e.g. an evaluation's few samples, are sampled flat)."""
        if self.sampling.spans:  # typed spans: each span under its own transform
            return span_sample(model, prompts, group_size, self.sampling, generator, greedy)
        if self.sampling.tree.fills(group_size) and not greedy:
            return tree_sample(model, prompts, group_size, self.sampling, generator=generator)
        return sample(model, prompts, group_size, self.sampling, generator=generator, greedy=greedy)

    def token_logprobs(
        self, model: Any, rollout: Rollout, with_entropy: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Teacher-forced (n, T) log-probs (and entropies) under the sampling transform."""
        if self.sampling.spans:
            return span_logprobs(model, rollout, self.sampling, with_entropy)
        return token_logprobs(model, rollout, self.sampling, with_entropy=with_entropy)

    def output_lengths(self, rollout: Rollout) -> list[int]:
        """Completion length of each sample in tokens (for length-based rewards)."""
        return rollout.lengths.tolist()
