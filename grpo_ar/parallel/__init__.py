"""Data parallelism under torchrun: DDP, FSDP2 (`fsdp.py`) and the Lightning module
(`lightning.py`, optional extra). `build_parallel` picks one by `trainer.strategy`."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .ddp import (
    STRATEGIES,
    DataParallel,
    DDPParallel,
    Parallel,
    derive_seed,
    init_distributed,
    launched,
    resolve_strategy,
    world_size,
)
from .fsdp import FSDP2Parallel

__all__ = [
    "STRATEGIES",
    "DDPParallel",
    "DataParallel",
    "FSDP2Parallel",
    "Parallel",
    "build_parallel",
    "derive_seed",
    "init_distributed",
    "launched",
    "resolve_strategy",
    "world_size",
]


def build_parallel(strategy: str, device: torch.device) -> Parallel:
    """The Parallel for `trainer.strategy` (auto: ddp under torchrun, else none); joins the
    torchrun process group (nccl for a CUDA model, gloo for a CPU one) if not done yet."""
    name = resolve_strategy(strategy)
    if name == "none":
        return Parallel()
    if not dist.is_initialized():
        init_distributed(device.type)
    if name == "ddp":
        return DDPParallel()
    return FSDP2Parallel()
