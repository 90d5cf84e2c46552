"""Rollout backends: what the trainer samples with, behind one typed seam.

A backend turns a `PromptBatch` into a `Rollout` of G completions per prompt (token ids, masks,
truncation flags and `sampling_logp`, the log-prob of each token under the distribution it was
actually drawn from), takes the policy's weights after each optimizer step, and says at start-up
what it cannot do. `builtin` is grpo_ar's own KV-cached sampler (`generation.sampler`) reached
through the adapter, exactly as before; `vllm` (generation/vllm_backend.py) is the vLLM engine,
in-process or in a server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..core.registry import Registry
from ..types import PromptBatch, Rollout
from .decode_weights import DecodeWeights, reusing
from .params import SamplingParams


@runtime_checkable
class RolloutBackend(Protocol):
    """The trainer's view of a sampler."""

    name: str

    def check(self, params: SamplingParams) -> None:
        """Raise ConfigError (naming the option) for anything this backend cannot sample."""

    def generate(
        self, model: Any, prompts: PromptBatch, group_size: int,
        generator: torch.Generator | None = None, greedy: bool = False,
    ) -> Rollout:  # fmt: skip
        """G completions per prompt, groups contiguous, `sampling_logp` recorded."""

    def sync(self, model: Any, version: int) -> None:
        """Make the policy of `version` the one sampled from next. The trainer's
        `weights_version` changes whenever the weights do (optimizer step, checkpoint load),
        so what a backend built from one version is current exactly while it is pushed."""

    def reset(self) -> None:
        """Drop cached state that the weights made (e.g. a prefix cache)."""

    def release(self) -> None:
        """The step's sampling is done: free what was kept only to share between the sample
        calls of one weights version, before the update needs the memory."""

    def close(self) -> None:
        """Release the engine."""


class BuiltinBackend:
    """The adapter's own sampler: `adapter.sample`, with the trainer's model, as before. Its
    decode-step weights (`DecodeWeights`) are built once per weights version `sync` pushes:
    sample calls of one version (dynamic-sampling rounds, ReMax's greedy pass) share them, a
    new version rebuilds them; before the first `sync` every call builds its own."""

    name = "builtin"

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        self.weights = DecodeWeights()

    def check(self, params: SamplingParams) -> None:
        return None  # the built-in sampler implements every SamplingParams option

    def generate(
        self, model: Any, prompts: PromptBatch, group_size: int,
        generator: torch.Generator | None = None, greedy: bool = False,
    ) -> Rollout:  # fmt: skip
        with reusing(self.weights):
            return self.adapter.sample(
                model, prompts, group_size, generator=generator, greedy=greedy
            )

    def sync(self, model: Any, version: int) -> None:
        self.weights.set_version(version)  # it samples with the trained module itself

    def reset(self) -> None:
        self.weights.set_version(None)  # no reuse until the next sync

    def release(self) -> None:
        # the decode weights (~0.7x the layer weights) would otherwise stay alive through the
        # update; a plain step samples once per version, so keeping them past it buys nothing
        self.weights.set_version(None)

    def close(self) -> None:
        return None


# name -> factory(rollout_config, adapter, model, finetune, run_config) -> RolloutBackend
BACKENDS: Registry = Registry("rollout backend")
BACKENDS.register("builtin")(lambda rcfg, adapter, model, finetune, cfg: BuiltinBackend(adapter))


@BACKENDS.register("vllm")
def _vllm(rcfg: Any, adapter: Any, model: Any, finetune: Any, cfg: Any) -> RolloutBackend:
    from .vllm_backend import build_vllm_backend  # imports vllm only when asked for

    return build_vllm_backend(rcfg, adapter, model, finetune, cfg)


def build_backend(rcfg: Any, adapter: Any, model: Any, finetune: Any, cfg: Any) -> RolloutBackend:
    """The configured backend, its capability check passed against the adapter's sampling."""
    factory: Callable[..., RolloutBackend] = BACKENDS[rcfg.backend]
    backend = factory(rcfg, adapter, model, finetune, cfg)
    if rcfg.async_steps:
        from .async_backend import OneStepAhead

        backend = OneStepAhead(backend)
    backend.check(adapter.sampling)
    return backend


def with_rollout_defaults(cfg: Any) -> Any:
    """`cfg` with what the backend implies: an engine whose dtype differs from the trainer's
    samples from another distribution (bf16 vs fp32: mean |Δlogp| 0.036, max 0.37 on SmolLM2),
    and so does a one-step-async rollout (sampled by the previous policy): the sampler IS
    correction is on (TRL's default, token_truncate with c_max 3) unless
    `algorithm.is_correction` says otherwise."""
    r, a = cfg.rollout, cfg.algorithm
    if r.backend == "builtin" or a.is_correction is not None:
        return cfg
    compute = cfg.model.compute_dtype
    if r.engine_dtype(compute) == compute and r.async_steps == 0:
        return cfg  # same dtype, same policy: nothing to correct
    algo = replace(a, is_correction="token_truncate", is_correction_args={"c_max": 3.0})
    return replace(cfg, algorithm=algo)


def record_sampler_gap(stats: Any, train_logp: Tensor, sampling_logp: Tensor, mask: Tensor) -> None:
    """Log how far the engine's distribution is from the trainer's on the sampled tokens:
    `sampling/logp_diff/{mean,max}` of |logp_train - logp_sampler| over real tokens and
    `sampling/is_ratio/{min,mean,max}` of exp(logp_train - logp_sampler), as TRL does for its
    vLLM importance sampling. Means are token means over micro-batches (and ranks)."""
    m = mask.bool()
    if not bool(m.any()):
        return
    diff = train_logp.detach().float() - sampling_logp.float()  # (B, T)
    stats.add_tokens("sampling/logp_diff/mean", diff.abs(), mask)
    stats.add_tokens("sampling/is_ratio/mean", diff.exp(), mask)
    d = diff[m]
    v = stats.values
    v["sampling/logp_diff/max"] = max(v.get("sampling/logp_diff/max", 0.0), float(d.abs().max()))
    v["sampling/is_ratio/max"] = max(v.get("sampling/is_ratio/max", 0.0), float(d.exp().max()))
    v["sampling/is_ratio/min"] = min(
        v.get("sampling/is_ratio/min", float("inf")), float(d.exp().min())
    )
