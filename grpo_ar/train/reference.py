"""Reference policies for the KL term.

Every kind answers `logprobs(adapter, rollout)` (no grad), `refresh(policy)` (the seed's
"replace ref model with current proxy model" after each iteration), `mix(policy, alpha)`
(TR-DPO soft sync, arXiv 2404.09656: π_ref <- α·π + (1 - α)·π_ref in weight space; alpha = 1
is `refresh`) and `state_dict()` / `load_state_dict()` (what a checkpoint needs to restore it).

`REFERENCE_REFRESH` holds when a run moves its reference (algorithm.reference_refresh): each
entry builds a `RefreshPolicy` whose hooks the trainer calls at start-up, after every optimizer
step and at the end of every iteration.

- `FrozenCopy` (full fine-tuning) keeps a frozen copy of the whole policy.
- `AdapterReference` (peft, LyCORIS) holds one model. Until the first refresh the reference is
  the base model with the adapter switched off (peft `disable_adapter()`, LyCORIS multiplier 0,
  or `restore()` where multiplier 0 is not the base, e.g. DoRA). A refresh keeps a frozen copy of
  the adapter tensors (small); the reference pass swaps them into the live adapter and back.
  Why a copy and not "merge the adapter into the base and re-initialise it": the base never
  changes (adapter-only checkpoints stay complete, disabled = the original model, bitwise), the
  reference after a refresh is bitwise the policy before it (same tensors, same computation,
  where a merge rounds), and the optimizer's moments keep describing the live parameters (a
  re-initialised adapter would carry stale Adam state).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from ..core.registry import Registry
from ..io.checkpoint import load_tied_state_dict
from ..types import Rollout

if TYPE_CHECKING:
    from ..adapters.base import Adapter


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"reference mix alpha={alpha}: need 0 < alpha <= 1")


class FrozenCopy:
    """A frozen copy of the policy, refreshed by `load_state_dict`."""

    def __init__(self, policy: torch.nn.Module) -> None:
        self.model = copy.deepcopy(policy).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def logprobs(self, adapter: Adapter, rollout: Rollout) -> Tensor:
        """(n, T) reference log-probs of the rollout's tokens, same transform as the policy."""
        return adapter.token_logprobs(self.model, rollout)[0]

    @torch.no_grad()
    def refresh(self, policy: torch.nn.Module) -> None:
        self.model.load_state_dict(policy.state_dict())

    def check_mix(self, alpha: float) -> None:
        """Raise now if `mix(policy, alpha)` would (here: only a bad alpha)."""
        _check_alpha(alpha)

    @torch.no_grad()
    def mix(self, policy: torch.nn.Module, alpha: float) -> None:
        """TR-DPO: θ_ref <- α·θ + (1 - α)·θ_ref for every parameter (buffers copied)."""
        self.check_mix(alpha)
        if alpha == 1.0:
            return self.refresh(policy)
        mine = dict(self.model.named_parameters())
        for name, p in policy.named_parameters():
            mine[name].lerp_(p.detach(), alpha)
        own_buffers = dict(self.model.named_buffers())
        for name, b in policy.named_buffers():
            own_buffers[name].copy_(b)

    def module(self) -> torch.nn.Module | None:
        """The frozen module, which a checkpoint stores for the reference."""
        return self.model

    def state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        load_tied_state_dict(self.model, sd)


class AdapterHost(Protocol):
    """What an adapter fine-tune (grpo_ar.finetune) offers its reference."""

    @property
    def model(self) -> torch.nn.Module:
        """The one model: the policy, and the reference under `adapter_off` / swapped tensors."""

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """The adapter's tensors by name in `model`."""

    def adapter_off(self) -> contextlib.AbstractContextManager[None]:
        """Context in which `model` computes the base model exactly."""

    def mix_refusal(self) -> str | None:
        """Why weight-space mixing is not exact for this adapter (None: it is)."""

    def identity(self) -> dict[str, Tensor]:
        """Adapter tensors under which the model is the base (for mixing from the base)."""


class AdapterReference:
    """The reference of a peft / LyCORIS fine-tune: the base (adapter off) until the first
    refresh, then a frozen copy of the adapter tensors swapped in for the reference pass."""

    def __init__(self, host: AdapterHost) -> None:
        self.host = host
        self.frozen: dict[str, Tensor] | None = None  # None: the reference is the base

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Context in which `host.model` computes the reference policy."""
        if self.frozen is None:
            with self.host.adapter_off():
                yield
            return
        params = self.host.trainable()
        live = {name: p.data for name, p in params.items()}
        try:
            for name, p in params.items():
                p.data = self.frozen[name]
            yield
        finally:
            for name, p in params.items():
                p.data = live[name]

    @torch.no_grad()
    def logprobs(self, adapter: Adapter, rollout: Rollout) -> Tensor:
        """(n, T) reference log-probs of the rollout's tokens, same transform as the policy."""
        with self.active():
            return adapter.token_logprobs(self.host.model, rollout)[0]

    def _policy_tensors(self, policy: torch.nn.Module) -> dict[str, Tensor]:
        names = self.host.trainable().keys()
        params = dict(policy.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"the policy has no adapter tensor {missing[0]!r}")
        return {n: params[n].detach() for n in names}

    @torch.no_grad()
    def refresh(self, policy: torch.nn.Module) -> None:
        """Reference <- policy: a frozen copy of the adapter tensors."""
        self.frozen = {n: t.clone() for n, t in self._policy_tensors(policy).items()}

    def check_mix(self, alpha: float) -> None:
        """Raise now if `mix(policy, alpha)` would: a bad alpha, or alpha < 1 where the
        weight-space mix is not an adapter of the same form."""
        _check_alpha(alpha)
        reason = self.host.mix_refusal()
        if alpha < 1.0 and reason is not None:
            raise ValueError(
                f"reference mix with alpha={alpha} (TR-DPO soft sync) is not exact here: "
                f"{reason}. Use alpha=1 (a plain refresh), algorithm.reference_refresh="
                "iteration, or an adapter whose weight is affine in its tensors "
                "(finetune.method=full, or lycoris algo full / ia3)"
            )

    @torch.no_grad()
    def mix(self, policy: torch.nn.Module, alpha: float) -> None:
        """TR-DPO θ_ref <- α·θ + (1 - α)·θ_ref on the adapter tensors; exact in weight space
        only where the adapted weight is affine in them (refused otherwise)."""
        self.check_mix(alpha)
        if alpha == 1.0:
            return self.refresh(policy)
        policy_t = self._policy_tensors(policy)
        if self.frozen is None:
            self.frozen = {n: t.clone() for n, t in self.host.identity().items()}
        for name, t in policy_t.items():
            self.frozen[name] = self.frozen[name].to(t).lerp_(t, alpha)

    def module(self) -> torch.nn.Module | None:
        """None: no module of its own (the policy's model with other adapter tensors)."""
        return None

    def state_dict(self) -> dict[str, Tensor]:
        """The frozen adapter tensors; empty while the reference is the base."""
        return dict(self.frozen or {})

    def load_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        if not sd:
            self.frozen = None
            return
        params = self.host.trainable()
        if set(sd) != set(params):
            extra, missing = sorted(set(sd) - set(params)), sorted(set(params) - set(sd))
            raise ValueError(
                f"reference adapter tensors do not fit: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        self.frozen = {n: sd[n].to(params[n]).clone() for n in params}


class Reference(Protocol):
    """What the trainer asks of a reference policy (FrozenCopy, AdapterReference, FSDP2's)."""

    def logprobs(self, adapter: Adapter, rollout: Rollout) -> Tensor:
        """(n, T) reference log-probs of the rollout's tokens, no grad."""

    def refresh(self, policy: torch.nn.Module) -> None:
        """Reference <- policy."""

    def check_mix(self, alpha: float) -> None:
        """Raise now if `mix(policy, alpha)` would."""

    def mix(self, policy: torch.nn.Module, alpha: float) -> None:
        """TR-DPO: π_ref <- α·π + (1 - α)·π_ref."""

    def module(self) -> torch.nn.Module | None:
        """A module of its own (a frozen copy), to checkpoint and move; None if it has none."""


class RefreshPolicy(Protocol):
    """When the reference moves; every hook is called, a policy acts in the ones it needs."""

    def check(self, reference: Reference) -> None:
        """At start-up: refuse what this policy could not do exactly, before any step."""

    def after_update(self, reference: Reference, policy: torch.nn.Module, updates: int) -> None:
        """After optimizer step number `updates` (1-based; skipped steps not counted)."""

    def after_iteration(self, reference: Reference, policy: torch.nn.Module) -> None:
        """At the end of each iteration (`trainer.steps_per_iteration` steps)."""


class RefreshFactory(Protocol):
    """The signature every `REFERENCE_REFRESH` entry shares: the TR-DPO options in, a policy
    out (the options a policy does not use are ignored)."""

    def __call__(self, *, mix_alpha: float, sync_every: int) -> RefreshPolicy: ...


REFERENCE_REFRESH: Registry[RefreshFactory] = Registry("reference refresh")


@REFERENCE_REFRESH.register("never")
class NeverRefresh:
    """The reference stays the initial policy for the whole run (every hook does nothing)."""

    def __init__(self, *, mix_alpha: float, sync_every: int) -> None:
        pass

    def check(self, reference: Reference) -> None:
        pass

    def after_update(self, reference: Reference, policy: torch.nn.Module, updates: int) -> None:
        pass

    def after_iteration(self, reference: Reference, policy: torch.nn.Module) -> None:
        pass


@REFERENCE_REFRESH.register("iteration")
class IterationRefresh(NeverRefresh):
    """Reference <- policy after each iteration: the seed's "replace ref model with current
    proxy model", the GRPO paper's iterative RL (arXiv 2402.03300 Algorithm 1)."""

    def after_iteration(self, reference: Reference, policy: torch.nn.Module) -> None:
        reference.refresh(policy)


@REFERENCE_REFRESH.register("soft")
class SoftRefresh(NeverRefresh):
    """TR-DPO soft sync (arXiv 2404.09656): π_ref <- α·π + (1 - α)·π_ref every `sync_every`
    optimizer steps."""

    def __init__(self, *, mix_alpha: float, sync_every: int) -> None:
        self.alpha, self.every = mix_alpha, sync_every

    def check(self, reference: Reference) -> None:
        # an adapter whose weight is not affine in its tensors cannot mix exactly: say so now
        reference.check_mix(self.alpha)

    def after_update(self, reference: Reference, policy: torch.nn.Module, updates: int) -> None:
        if updates % self.every == 0:
            reference.mix(policy, self.alpha)
