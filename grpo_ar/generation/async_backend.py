"""One-step async rollouts (verl's one_step_off_policy, TRL's AsyncGRPOTrainer with
max_staleness 1): while step k trains, the engine already samples step k+1's prompts from the
weights of step k's start, in a worker thread (the engine computes in its own process in server
mode, in torch kernels that release the GIL when colocated).

Each rollout records the policy version it came from (`extras["policy_version"]`); the trainer
corrects the one step of staleness with the sampler IS weights (algorithm.is_correction, on by
default with async). With `rollout.async_steps = 0` this wrapper is not built at all.
"""

from __future__ import annotations

import copy
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ..types import PromptBatch, Rollout
from .params import SamplingParams
from .vllm_backend import draw_seed


def _key(prompts: PromptBatch, group_size: int, seed: int, greedy: bool) -> tuple:
    return (prompts.input_ids.cpu().numpy().tobytes(), tuple(prompts.input_ids.shape),
            group_size, seed, greedy)  # fmt: skip


class OneStepAhead:
    """Wraps a backend with `generate_seeded`: `prefetch` starts a rollout now; `generate` of
    the same prompts and seed returns it (else samples at once); `sync` waits for the rollout in
    flight before the weights change under it."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name = inner, inner.name
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grpo-ar-rollout")
        self.pending: dict[tuple, tuple[Future, int]] = {}
        self.version = -1
        self.ahead_s = 0.0  # seconds of rollouts sampled in the background so far

    def check(self, params: SamplingParams) -> None:
        self.inner.check(params)

    def prefetch(self, prompts: PromptBatch, group_size: int, seed: int) -> None:
        def run() -> tuple[Rollout, float]:
            start = time.perf_counter()
            rollout = self.inner.generate_seeded(prompts, group_size, seed)
            return rollout, time.perf_counter() - start

        fut = self.pool.submit(run)
        self.pending[_key(prompts, group_size, seed, False)] = (fut, self.version)

    def prefetch_next(
        self, adapter: Any, prompt_sampler: Any, device: Any, step_seed: int, group_size: int
    ) -> None:
        """Start the next step's rollout: the prompts `prompt_sampler` will hand out next (a copy
        is advanced, not the sampler) and the engine seed that step's generator will draw."""
        entries = copy.copy(prompt_sampler).next_batch()
        prompts = adapter.encode(entries).to(device)
        gen = torch.Generator(device=device).manual_seed(step_seed)
        self.prefetch(prompts, group_size, draw_seed(gen))

    def generate(
        self, model: Any, prompts: PromptBatch, group_size: int,
        generator: torch.Generator | None = None, greedy: bool = False,
    ) -> Rollout:  # fmt: skip
        seed = draw_seed(generator)
        hit = self.pending.pop(_key(prompts, group_size, seed, greedy), None)
        if hit is None:  # not prefetched (first step, dynamic-sampling rounds): sample now
            rollout = self.inner.generate_seeded(prompts, group_size, seed, greedy)
            rollout.extras["policy_version"] = self.version
            return rollout
        fut, version = hit
        rollout, seconds = fut.result()
        self.ahead_s += seconds
        rollout.extras["policy_version"] = version
        return rollout

    def sync(self, model: Any, version: int) -> None:
        for fut, _ in self.pending.values():  # it samples from the old weights: let it finish
            fut.result()
        self.inner.sync(model, version)
        self.version = version

    def reset(self) -> None:
        self.inner.reset()

    def release(self) -> None:
        return None  # the next step's rollouts are being sampled now, with what it keeps

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.inner.close()
