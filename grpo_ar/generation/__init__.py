"""Generation: the sampling distribution (`params`), one model call with a KV cache
(`model_call`), the group sampler (`sampler`) and its fast decode step (`decode_step`),
teacher-forced scoring under the same distribution (`scoring`) and packed completions
(`packing`)."""

from __future__ import annotations

from .params import SamplingParams, transform_logits
from .sampler import sample
from .scoring import token_logprobs

__all__ = ["SamplingParams", "sample", "token_logprobs", "transform_logits"]
