"""What is trained: the whole model, a peft adapter or a LyCORIS network, behind one
`Finetune` interface (the choices and their reasons: `base.py`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .base import (
    ALGOS,
    LLAMA_TARGETS,
    AdaptedLM,
    AdapterFinetune,
    Finetune,
    FinetuneConfig,
    resolve_targets,
)
from .lycoris_backend import LycorisFinetune
from .peft_backend import PeftFinetune

__all__ = [
    "ALGOS",
    "LLAMA_TARGETS",
    "AdaptedLM",
    "AdapterFinetune",
    "Finetune",
    "FinetuneConfig",
    "LycorisFinetune",
    "PeftFinetune",
    "build_finetune",
    "resolve_targets",
]


def build_finetune(
    model: nn.Module, cfg: FinetuneConfig, need_reference: bool, seed: int | None = None
) -> Finetune:
    """Wrap `model` for training by `cfg.method`; the reference only when `need_reference`.
    `seed`: adapter initialisation from this seed (the global RNG is left as it was)."""
    if cfg.method == "full":
        return Finetune(model, need_reference)
    cls: Callable[[nn.Module, FinetuneConfig, bool], AdapterFinetune]
    cls = PeftFinetune if cfg.method == "peft" else LycorisFinetune
    with torch.random.fork_rng(enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        return cls(model, cfg, need_reference)
