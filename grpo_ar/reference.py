"""Reference policies for the KL term.

`FrozenCopy` (full fine-tuning) keeps a frozen copy of the policy; `refresh` is the seed's
"replace ref model with current proxy model" after each iteration. Adapter-based references
(peft disabled adapter, LyCORIS multiplier 0) share the interface and hold one model.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from .rollout import Rollout


class FrozenCopy:
    """A frozen copy of the policy, refreshed by `load_state_dict`."""

    def __init__(self, policy: torch.nn.Module) -> None:
        self.model = copy.deepcopy(policy).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def logprobs(self, adapter: Any, rollout: Rollout) -> Tensor:
        """(n, T) reference log-probs of the rollout's tokens, same transform as the policy."""
        return adapter.token_logprobs(self.model, rollout)[0]

    @torch.no_grad()
    def refresh(self, policy: torch.nn.Module) -> None:
        self.model.load_state_dict(policy.state_dict())

    def module(self) -> torch.nn.Module:
        """What a checkpoint stores for the reference."""
        return self.model
