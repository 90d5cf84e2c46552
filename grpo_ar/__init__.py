"""grpo_ar: GRPO and its relatives for any autoregressive token model.

The public API is `__all__` below (and `grpo_ar.adapters.__all__`); everything else is private
and may change. Importing the package stays light: names load on first use.
"""

from __future__ import annotations

from typing import Any

from .lazy import load_export

__version__ = "0.1.0"

_PUBLIC = {
    # the run
    "Trainer": "grpo_ar.train.trainer",
    "Config": "grpo_ar.config",
    "ConfigError": "grpo_ar.errors",
    "load_config": "grpo_ar.config",
    "FinetuneConfig": "grpo_ar.finetune",
    "build_finetune": "grpo_ar.finetune",
    "GRPOModule": "grpo_ar.parallel.lightning",  # needs the `lightning` extra
    # data and rewards
    "Entry": "grpo_ar.types",
    "load_rows": "grpo_ar.io.data",
    "load_entries": "grpo_ar.io.data",
    "register_reward": "grpo_ar.rewards",
    "per_sample": "grpo_ar.rewards",
    "group_reward": "grpo_ar.rewards",
    "RewardContext": "grpo_ar.rewards",
    # what an adapter builds and returns
    "PromptBatch": "grpo_ar.types",
    "Rollout": "grpo_ar.types",
    "SamplingParams": "grpo_ar.generation.params",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    return load_export(__name__, _PUBLIC, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
