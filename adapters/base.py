"""The adapter contract: the public API for a modality.

Every method the trainer, the evaluation, the data-parallel wrappers and the CLI call is
declared here, so none of them probes an adapter with `getattr`: `encode`, `sample`,
`token_logprobs`, `decode`, `output_lengths`, `save_samples`, `save_tokenizer`, `model_call` and
the `sampling` attribute. A new modality is a subclass that implements `encode` and `decode`;
sampling and teacher-forced log-probs come from the shared KV-cached sampler, under one logits
transform, so that `token_logprobs` on a sampled rollout equals the rollout's `sampling_logp`
(the invariant the trainer relies on). The other hooks have defaults that fit text.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from grpo_ar.generation.model_call import MODEL_CALLS, ModelCall
from grpo_ar.generation.params import SamplingParams
from grpo_ar.generation.sampler import sample
from grpo_ar.generation.scoring import token_logprobs
from grpo_ar.generation.spans import span_logprobs, span_sample
from grpo_ar.generation.tree import tree_sample
from grpo_ar.types import Entry, PromptBatch, Rollout


class Adapter(ABC):
    """Entries -> prompt tokens -> sampled groups -> decoded outputs, for one modality."""

    sampling: SamplingParams
    """The logits transform and stopping rules of sampling (its pad id pads joined rollouts)."""

    call_name: str = "causal_lm"
    """The `MODEL_CALLS` entry this adapter's model runs through (`model_call`)."""

    def __init__(self, sampling: SamplingParams) -> None:
        self.sampling = sampling

    def model_call(self, model: nn.Module) -> ModelCall:
        """How sampling and scoring call `model` (generation/model_call.py): embed the ids, run
        the transformer with its KV cache, map hidden states to logits. Default: the
        `call_name` entry of `MODEL_CALLS` ("causal_lm": a transformers causal LM whose one
        vocabulary holds every token); Janus image generation uses "janus_image". A ModelCall
        passed in is used as it is."""
        return model if isinstance(model, ModelCall) else MODEL_CALLS[self.call_name](model)

    @abstractmethod
    def encode(self, entries: Sequence[Entry]) -> PromptBatch:
        """Entries -> left-padded prompt token ids (and CFG-unconditional prompts where used)."""

    @abstractmethod
    def decode(self, rollout: Rollout) -> list[Any]:
        """Completion tokens -> what rewards read (str, PIL image, frames), one per sample (N)."""

    def sample(
        self,
        model: nn.Module,
        prompts: PromptBatch,
        group_size: int,
        generator: torch.Generator | None = None,
        greedy: bool = False,
    ) -> Rollout:
        """G completions per prompt, groups contiguous, with the sampler's log-probs recorded
        (as trees of shared segments under `[sampling.tree]`; greedy runs, and a group size the
        tree's leaves cannot fill, e.g. an evaluation's few samples, are sampled flat)."""
        call = self.model_call(model)
        if self.sampling.spans:  # typed spans: each span under its own transform
            return span_sample(call, prompts, group_size, self.sampling, generator, greedy)
        if self.sampling.tree.fills(group_size) and not greedy:
            return tree_sample(call, prompts, group_size, self.sampling, generator=generator)
        return sample(call, prompts, group_size, self.sampling, generator=generator, greedy=greedy)

    def token_logprobs(
        self, model: nn.Module, rollout: Rollout, with_entropy: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Teacher-forced (n, T) log-probs (and entropies) under the sampling transform."""
        call = self.model_call(model)
        if self.sampling.spans:
            return span_logprobs(call, rollout, self.sampling, with_entropy)
        return token_logprobs(call, rollout, self.sampling, with_entropy=with_entropy)

    def output_lengths(self, rollout: Rollout) -> list[int]:
        """Completion length of each sample in tokens (for length-based rewards)."""
        return rollout.lengths.tolist()

    def save_samples(self, outputs: Sequence[Any], directory: Path) -> list[Path] | None:
        """Write decoded outputs that are not JSON (images, clips) under `directory`, one file
        per output, and return the paths; samples.jsonl then refers to them. None (the default):
        nothing written, the outputs go into samples.jsonl as they are (text)."""
        return None

    def save_tokenizer(self, directory: Path) -> None:
        """Write what turns the exported policy's token ids into this modality's inputs and
        outputs besides the weights (a text adapter's tokenizer) into `directory`, for
        `grpo-ar export`. Default: nothing (code-grid adapters' tokens are VQ codes)."""
        return None

    def summarize(self, output: Any) -> Any:
        """What samples.jsonl shows for one decoded output (JSON): strings and numbers as they
        are, arrays and tensors as {"shape", "dtype"}, images as {"image": [H, W]}, short lists
        and dicts item by item, anything else as a short repr. Override for a better view;
        adapters with `save_samples(outputs, directory)` have their outputs written as files
        and referenced by path instead."""
        return summary(output)


def summary(x: Any, depth: int = 0) -> Any:
    """A short JSON value describing `x` (see `Adapter.summarize`); never a long repr."""
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if hasattr(x, "shape") and hasattr(x, "dtype"):  # tensors, arrays
        if getattr(x, "ndim", None) == 0:
            return summary(x.item(), depth)
        return {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}
    if hasattr(x, "size") and hasattr(x, "mode") and hasattr(x, "getpixel"):  # PIL images
        return {"image": [x.size[1], x.size[0]]}
    if isinstance(x, dict) and depth < 2 and len(x) <= 16:
        return {str(k): summary(v, depth + 1) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and depth < 2 and len(x) <= 16:
        return [summary(v, depth + 1) for v in x]
    if isinstance(x, (list, tuple, dict)):
        return {type(x).__name__: len(x)}
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."
