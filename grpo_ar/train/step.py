"""Optimizer, schedule and metric plumbing of the trainer."""

from __future__ import annotations

import importlib
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from ..config.algorithm import AlgorithmConfig
from ..config.run import TrainerConfig
from ..core.corrections import AdaptiveEntropyCoef
from ..core.objective import TokenTerms, token_objective
from ..errors import ConfigError, RunError
from ..types import Rollout


def import_object(path: str) -> Any:
    """`package.module.Name` -> the object. A config is trusted like code (it names what is
    imported), but the working directory is not searched (`python -m` puts it first on
    sys.path), so a stray file there cannot shadow a package; GRPO_AR_IMPORT_CWD=1 allows it."""
    module, _, name = path.rpartition(".")
    saved = list(sys.path)
    if os.environ.get("GRPO_AR_IMPORT_CWD", "") in ("", "0"):
        cwd = os.getcwd()
        sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.abspath(p) != cwd]
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"cannot import {path!r}: {e}") from None
    finally:
        sys.path[:] = saved


def build_optimizer(model: torch.nn.Module, t: TrainerConfig) -> torch.optim.Optimizer:
    """Any torch.optim-style class by import path (the seed mentions SOAP, PSGD)."""
    cls = import_object(t.optimizer)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(
            f"trainer.optimizer={t.optimizer!r} is not a torch.optim.Optimizer class: name one, "
            "e.g. torch.optim.AdamW"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    args = dict(t.optimizer_args)
    if cls in (torch.optim.Adam, torch.optim.AdamW) and not {"fused", "foreach"} & set(args):
        # one fused kernel over all tensors (TRL's default too): ~4x less optimizer time on CPU
        args["fused"] = all(p.device.type in ("cpu", "cuda") for p in params)
    try:
        return cls(params, lr=t.lr, weight_decay=t.weight_decay, **args)
    except TypeError as e:
        raise ConfigError(f"trainer.optimizer={t.optimizer}: {e}") from None


def build_scheduler(
    opt: torch.optim.Optimizer, t: TrainerConfig, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then constant / linear / cosine decay, per optimizer step."""
    warm, kind = t.warmup_steps, t.lr_schedule

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 1.0 - progress if kind == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere: `nn.Dropout` modules and float `*dropout*` attributes (HF
    attention layers keep their rate as a float, e.g. Llama's `attention_dropout`)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for name, value in list(vars(m).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(m, name, 0.0)


def entropy_controller(a: AlgorithmConfig) -> AdaptiveEntropyCoef:
    """The entropy-bonus coefficient of the [algorithm] config `a` (adaptive with a target)."""
    return AdaptiveEntropyCoef(
        a.entropy_coef,
        target=a.entropy_target if a.entropy_target is not None else 0.0,
        delta=a.entropy_coef_delta,
        coef_min=a.entropy_coef_min,
        coef_max=a.entropy_coef_max,
        adaptive=a.entropy_target is not None,
    )


def token_terms(
    a: AlgorithmConfig,
    mb: Rollout,
    logp: Tensor,
    ent: Tensor | None,
    mask: Tensor,
    generator: torch.Generator | None,
) -> TokenTerms:
    """`core.objective.token_objective` of a micro-batch under the [algorithm] config `a`."""
    return token_objective(
        logp,
        mb.data["old_logp"],
        mb.data["adv"],
        mask,
        loss=a.loss,
        loss_args=a.loss_args,
        ref_logp=mb.data.get("ref_logp"),
        beta=a.beta,
        kl=a.kl,
        kl_args=a.kl_args,
        kl_bias_correction=a.kl_bias_correction,
        sampling_logp=mb.sampling_logp,
        is_correction=a.is_correction,
        is_correction_args=a.is_correction_args,
        off_policy_mask_threshold=a.off_policy_mask_threshold,
        entropy=ent,
        top_entropy_quantile=a.top_entropy_quantile,
        generator=generator,
        loss_weight=mb.data.get("span_loss_weight"),  # typed spans (generation/spans.py)
        kl_weight=mb.data.get("span_kl_weight"),
    )


def zero_std_groups(rewards: Tensor, group_size: int) -> Tensor:
    """(P,) bool: groups whose valid rewards are all equal (they carry no learning signal)."""
    r = rearrange(rewards, "(p g) -> p g", g=group_size)
    valid = torch.isfinite(r)
    hi = torch.where(valid, r, torch.full_like(r, -math.inf)).amax(1)
    lo = torch.where(valid, r, torch.full_like(r, math.inf)).amin(1)
    return (hi <= lo) | (valid.sum(1) <= 1)


def zero_std_fraction(rewards: Tensor, group_size: int) -> float:
    """Fraction of groups whose valid rewards are all equal."""
    return float(zero_std_groups(rewards, group_size).float().mean())


class StepStats:
    """Accumulates token-weighted means, scalars, counts and timers over one step."""

    def __init__(self) -> None:
        self.token_sums: dict[str, list[Tensor]] = defaultdict(
            lambda: [torch.zeros(()), torch.zeros(())]
        )
        self.scalars: dict[str, list[float]] = defaultdict(list)
        self.counts: dict[str, int] = defaultdict(int)
        self.times: dict[str, float] = defaultdict(float)
        self.values: dict[str, float] = {}

    def add_tokens(self, name: str, x: Tensor, mask: Tensor) -> None:
        """Σ x and the token count over `mask`, kept on x's device (summary() reads them once:
        no host sync per micro-batch on a GPU)."""
        m = mask.bool()
        acc = self.token_sums[name]
        acc[0] = acc[0] + x.masked_fill(~m, 0).sum().float()
        acc[1] = acc[1] + m.sum().float()

    def add_terms(
        self, terms: TokenTerms, ent: Tensor, mask: Tensor, keep: Tensor | None = None
    ) -> None:
        """Token means of a micro-batch's objective terms (grpo_ar.core.objective.TokenTerms);
        `keep` (a 0-dim bool on the device) drops the whole micro-batch without a host sync."""
        if keep is not None:
            mask = mask.bool() & keep
        self.add_tokens("entropy", ent.detach(), mask)
        if terms.kl is not None:
            self.add_tokens("kl", terms.kl.detach(), mask)
        self.add_tokens("clip/low", terms.policy.clipped_low.expand_as(mask), mask)
        self.add_tokens("clip/high", terms.policy.clipped_high.expand_as(mask), mask)
        self.add_tokens("tokens/kept", terms.keep.expand_as(mask), mask)
        if terms.is_weight is not None:
            self.add_tokens("is_weight", terms.is_weight.expand_as(mask), mask)

    def add_sums(self, name: str, total: Tensor, count: Tensor) -> None:
        """A ratio Σ / count whose two sums add up over micro-batches and ranks (e.g. failed
        tool calls / calls)."""
        acc = self.token_sums[name]
        acc[0] = acc[0] + total.float()
        acc[1] = acc[1] + count.float()

    def add_scalar(self, name: str, x: Tensor | float) -> None:
        self.scalars[name].append(float(x))

    def count(self, name: str) -> None:
        self.counts[name] += 1

    def update(self, values: dict[str, float]) -> None:
        self.values.update(values)

    @contextmanager
    def timer(self, name: str) -> Iterator[None]:
        """Wall time of the block, CUDA's queued kernels included (a no-op sync on the CPU)."""
        cuda_sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            cuda_sync()
            self.times[name] += time.perf_counter() - start

    def summary(
        self, reduce: Callable[[dict[str, list[Tensor]]], dict[str, list[Tensor]]] | None = None
    ) -> dict[str, float]:
        """The step's metrics; `reduce` sums the token statistics over ranks (name -> [Σ, n])."""
        local = {k: [s.cpu(), n.cpu()] for k, (s, n) in self.token_sums.items()}  # one sync
        sums = local if reduce is None else reduce(local)
        out = dict(self.values)
        out.update({k: float(s / n.clamp(min=1)) for k, (s, n) in sums.items()})
        out.update({k: sum(v) / len(v) for k, v in self.scalars.items() if v})
        out.update({k: float(v) for k, v in self.counts.items()})
        out.update({f"time/{k}": v for k, v in self.times.items()})
        return out


def cuda_sync() -> None:
    """Wait for queued CUDA kernels, so a timer measures them, not their launch."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def memory_metrics(device: torch.device) -> dict[str, float]:
    """memory/allocated_gb and memory/peak_gb (since the last call) on a CUDA device; nothing on
    others (the CPU has no allocator statistics to report)."""
    if device.type != "cuda":
        return {}
    gb = 1024.0**3
    out = {
        "memory/allocated_gb": torch.cuda.memory_allocated(device) / gb,
        "memory/peak_gb": torch.cuda.max_memory_allocated(device) / gb,
    }
    torch.cuda.reset_peak_memory_stats(device)
    return out


# dense bf16 tensor-core peaks (FLOP/s, no sparsity) of the devices the name contains
BF16_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def bf16_peak(device: torch.device) -> float | None:
    """The device's bf16 peak from BF16_PEAKS, None for the CPU or an unlisted GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAKS.items() if k in name), None)


def mfu(n_params: int, tokens: float, seconds: float, peak: float | None) -> dict[str, float]:
    """perf/mfu of a training pass: 6·N FLOPs per token (forward 2N + backward 4N) over
    `seconds`, as a fraction of `peak`; nothing without a known peak."""
    if peak is None or seconds <= 0:
        return {}
    return {"perf/mfu": 6.0 * n_params * tokens / seconds / peak}


def check_reward_failures(result: Any, limit: float, rewards: Any, step: int) -> None:
    """Stop rather than train on a batch the rewards mostly failed to score (their advantages
    would be 0); runs on each rank's share, so the failing rank is named."""
    failed, n = int(torch.isnan(result.total).sum()), len(result.total)
    if n and failed / n > limit:
        errors = getattr(rewards, "last_errors", {})
        why = "; ".join(f"{k}: {v}" for k, v in errors.items()) or "no number returned"
        raise RunError(
            f"step {step + 1}: {failed} of {n} samples got no reward (more than "
            f"data.reward_max_failed_frac={limit}): {why}. Fix the reward, or raise "
            "data.reward_max_failed_frac to train on the rest"
        )
