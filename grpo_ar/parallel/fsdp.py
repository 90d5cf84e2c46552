"""FSDP2 (`fully_shard`) data parallelism: each decoder layer is a unit, the rest (embeddings,
final norm, LM head) belongs to a `ScoreNet` root whose forward is the training forward.

The decoder layers are those of the transformer the adapter's model call runs (`attn_module`:
Janus' language model, not its vision tower). Frozen parameters outside those layers (Janus'
vision tower and text embeddings, the VQ inside Janus / Chameleon / Emu3) are left out of the
root (`ignored_params`): each rank keeps them whole, they need no gradient reduction, and the VQ
decodes sampled codes after the sampling window, where a sharded one would be a DTensor.

Every FSDP2 forward all-gathers, so all ranks must run the same number of them. The sampler
does not (a rank stops when its rows end): sampling and evaluation run with every module
unsharded once around them, with no collective inside. Training forwards are one per
micro-batch and rank (grad_accum splits each rank's share equally; token budgets are refused).
The reference (a frozen copy) is sharded the same way. Checkpoints are full state dicts
(`get_model_state_dict(full_state_dict=True, cpu_offload=True)`, optimizer moments gathered
with `full_tensor`), written by rank 0 in the one-process format, so they load into one
process or any world size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from ..adapters.base import Adapter
from ..errors import ConfigError
from ..io.checkpoint import load_tensors
from ..types import Rollout
from .ddp import DataParallel, ScoreNet

if TYPE_CHECKING:
    from ..config.run import Config
    from ..finetune.base import Finetune

_LAYER_LISTS = ("layers", "h", "blocks", "block")


_T = TypeVar("_T", Tensor, None)  # pad keeps None as None and a tensor a tensor


def decoder_layers(model: nn.Module, adapter: Adapter | None = None) -> list[nn.Module]:
    """The decoder blocks (the first ModuleList named layers / h / blocks / block) of the
    transformer `adapter`'s model call runs (its `attn_module`), else of `model`."""
    body = model if adapter is None else adapter.model_call(model).attn_module
    for name, m in body.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and name.rsplit(".", 1)[-1] in _LAYER_LISTS:
            return list(m)
    raise ConfigError(
        f"trainer.strategy=fsdp2: no decoder layer list ({', '.join(_LAYER_LISTS)}) found in "
        f"{type(body).__name__}; use strategy=ddp"
    )


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """model.precision for FSDP2: a mixed precision all-gathers the fp32 master weights as
    bf16 / fp16 for compute and reduce-scatters gradients in fp32 (a sum of world-size bf16
    gradients would lose their low bits); other precisions keep the parameters' own dtype."""
    half = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}.get(precision)
    if half is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32)


def frozen_outside(model: nn.Module, layers: list[nn.Module]) -> set[str]:
    """Names of the frozen parameters outside `layers` (each tied tensor under one name)."""
    inside = {id(p) for layer in layers for p in layer.parameters()}
    return {n for n, p in model.named_parameters() if not p.requires_grad and id(p) not in inside}


def shard(
    model: nn.Module, adapter: Adapter, mesh: Any, precision: str = "fp32",
    whole: set[str] | None = None,
) -> FSDPModule:  # fmt: skip
    """fully_shard each decoder layer, then a ScoreNet root over the model without the
    parameters named in `whole` (default: `frozen_outside` the layers; a reference passes the
    policy's, so both have one layout); lazily initialised here so the root is the root even
    when a layer runs first (sampling)."""
    policy = mixed_precision_policy(precision)
    layers = decoder_layers(model, adapter)
    whole = frozen_outside(model, layers) if whole is None else whole
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    kept = {p for n, p in model.named_parameters() if n in whole}
    root = fully_shard(
        ScoreNet(model, adapter), mesh=mesh, mp_policy=policy, ignored_params=kept or None
    )
    root._get_fsdp_state()._lazy_init()  # noqa: SLF001 - no public way to fix the root
    return root


def _dedupe_tied(model: nn.Module, sd: Mapping[str, Any]) -> dict[str, Tensor]:
    """One name per tied parameter, the one safetensors' `save_model` keeps in one process
    (the first in sorted order), so both write the same keys; the loaders fill the others in."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    drop = {n for names in groups.values() for n in sorted(names)[1:]}
    return {k: v for k, v in sd.items() if k not in drop}


def _fill_tied(model: nn.Module, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    full = dict(sd)
    for names in groups.values():
        have = [n for n in names if n in full]
        for n in names:
            if n not in full and have:
                full[n] = full[have[0]]
    return full


def full_state(model: nn.Module) -> dict[str, Tensor]:
    """The gathered full state dict (on rank 0, CPU; empty elsewhere). A collective."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return _dedupe_tied(model, get_model_state_dict(model, options=opts))


def load_full_state(model: nn.Module, path: str | Path) -> None:
    """A full state dict file (every rank reads it) into the sharded model."""
    sd = _fill_tied(model, load_tensors(path))
    opts = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, cast("dict[str, Any]", sd), options=opts)


def widen(r: Rollout, width: int) -> Rollout:
    """The rollout with its completion columns right-padded (mask 0) to `width`."""
    t = r.completion_ids.shape[1]
    if t == width:
        return r

    def pad(x: _T) -> _T:
        if x is None or x.ndim < 2 or x.shape[1] != t:
            return x
        return torch.nn.functional.pad(x, (0, 0) * (x.ndim - 2) + (0, width - t))

    return replace(
        r,
        completion_ids=pad(r.completion_ids),
        completion_mask=pad(r.completion_mask),
        sampling_logp=pad(r.sampling_logp),
        span_ids=None if r.span_ids is None else pad(r.span_ids),
        data={k: pad(v) for k, v in r.data.items()},
    )


class ShardedReference:
    """A FrozenCopy whose model is sharded like the policy: log-probs through its own root;
    refresh / mix copy shard by shard (same layout as the policy)."""

    def __init__(self, frozen: Any, root: FSDPModule) -> None:
        self.frozen, self.root = frozen, root

    @torch.no_grad()
    def logprobs(self, adapter: Adapter, rollout: Rollout) -> Tensor:
        try:
            return self.root(rollout, False)[0]  # type: ignore[operator]  # an nn.Module too
        finally:  # a root keeps its tensors gathered after forward; no backward reshards them
            self.root.reshard()

    def refresh(self, policy: nn.Module) -> None:
        self.frozen.refresh(policy)

    def check_mix(self, alpha: float) -> None:
        self.frozen.check_mix(alpha)

    def mix(self, policy: nn.Module, alpha: float) -> None:
        self.frozen.mix(policy, alpha)

    def module(self) -> nn.Module | None:
        return self.frozen.model


class FSDP2Parallel(DataParallel):
    """fully_shard per decoder layer + root; unsharded sampling; full-state checkpoints."""

    name = "fsdp2"

    def check(self, cfg: Config) -> None:
        super().check(cfg)
        self.precision = cfg.model.precision
        if self.precision == "fp16-mixed":
            raise ConfigError(
                "model.precision=fp16-mixed with strategy=fsdp2: its gradient scaler is not "
                "tested over sharded gradients here; use bf16-mixed (no scaler needed)"
            )
        if cfg.trainer.micro_batch_tokens:
            raise ConfigError(
                "trainer.micro_batch_tokens with strategy=fsdp2: ranks would run different "
                "numbers of forwards (each one all-gathers); use trainer.grad_accum"
            )
        if cfg.finetune.method != "full":
            raise ConfigError(
                f"finetune.method={cfg.finetune.method} with strategy=fsdp2: adapters train "
                "under strategy=ddp (the frozen base is not sharded here)"
            )

    def setup(self, model: nn.Module, adapter: Adapter, reference: Any) -> Any:
        self.model, self.adapter = model, adapter
        device = next(model.parameters()).device
        mesh = init_device_mesh(device.type, (self.size,))
        precision = getattr(self, "precision", "fp32")  # check(cfg) sets it, before setup
        whole = frozen_outside(model, decoder_layers(model, adapter))
        self.root = shard(model, adapter, mesh, precision, whole)
        self.units = [m for m in self.root.modules() if isinstance(m, FSDPModule)]  # type: ignore[attr-defined]
        if reference is None:
            return None
        ref_root = shard(reference.model, adapter, mesh, precision, whole)
        return ShardedReference(reference, ref_root)

    def score(self, rollout: Rollout, with_entropy: bool = True) -> tuple[Tensor, Any]:
        return self.root(rollout, with_entropy)  # type: ignore[operator]  # an nn.Module too

    def align(self, micro: list[Rollout]) -> list[Rollout]:
        """One completion width on every rank: the scorer's number of forwards depends on it
        (a width-1 batch needs no continuation pass), and each forward all-gathers."""
        widths = torch.tensor([mb.completion_ids.shape[1] for mb in micro], device="cpu")
        widths = widths.to(self._comm_device())
        dist.all_reduce(widths, op=dist.ReduceOp.MAX)
        return [widen(mb, int(w)) for mb, w in zip(micro, widths.tolist())]

    @contextlib.contextmanager
    def sampling(self) -> Iterator[nn.Module]:
        """Every unit unsharded (root first), none resharded by a forward, until the end."""
        layers = [m for m in self.units if m is not self.root]
        for m in layers:
            m.set_reshard_after_forward(False, recurse=False)
        for m in self.units:
            m.unshard()
        self.model.eval()
        try:
            yield self.model
        finally:
            for m in self.units:
                m.reshard()
            for m in layers:
                m.set_reshard_after_forward(True, recurse=False)

    def no_sync(self, skip: bool) -> contextlib.AbstractContextManager[None]:
        self.root.set_requires_gradient_sync(not skip)
        return contextlib.nullcontext()

    def full(self, x: Tensor) -> Tensor:
        return x.full_tensor() if isinstance(x, DTensor) else x

    # checkpoints: gathered into the one-process format
    def policy_weights(self, finetune: Finetune) -> dict[str, Tensor]:
        return full_state(self.model)

    def load_policy(self, finetune: Finetune, path: Path) -> None:
        load_full_state(self.model, path)

    def reference_weights(self, reference: Any) -> dict[str, Tensor] | None:
        return None if reference is None else full_state(reference.frozen.model)

    def load_reference(self, reference: Any, path: Path) -> None:
        if reference is not None and path.exists():
            load_full_state(reference.frozen.model, path)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        sd = optimizer.state_dict()
        state = {
            i: {k: self.full(v).cpu() if isinstance(v, Tensor) else v for k, v in s.items()}
            for i, s in sd["state"].items()
        }
        return {**sd, "state": state}

    def load_optimizer(self, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"]]

        def place(i: int, v: Any) -> Any:
            p = params[i]
            if isinstance(p, DTensor) and isinstance(v, Tensor) and v.shape == p.shape:
                v = v.to(device=p.device_mesh.device_type, dtype=p.dtype)
                return distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
            return v

        sharded = {
            int(i): {k: place(int(i), v) for k, v in s.items()} for i, s in state["state"].items()
        }
        optimizer.load_state_dict({**state, "state": sharded})
