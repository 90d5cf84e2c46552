"""FastStep's built decode weights kept across sample calls, once per weights version.

`generation.decode_step.FastStep` runs a decode step from copies of the model's weights (q/k/v
and gate/up concatenated, transposed on the CPU, cast under autocast): for SmolLM2 on the CPU
that is every weight matrix copied, per `sample` call. A `DecodeWeights` store keeps them while
the weights do not change; the rollout backend owns one (generation/backends.py) and the
trainer tells it when the weights change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

from torch import nn


class DecodeWeights:
    """FastStep's built weights (q/k/v and gate/up concatenated; transposed on the CPU; cast
    under autocast) kept across sample calls for one weights version.

    Equals building them in every FastStep, provided the version changes whenever the
    weights do. The version is explicit because nothing else tells: a fused AdamW step writes
    the parameters without bumping their `_version` counters (a cache keyed on those served
    stale weights). The trainer bumps it where it steps the optimizer or loads a checkpoint
    and pushes it through `RolloutBackend.sync`; the built-in backend samples inside
    `reusing(store)`, and drops them (`RolloutBackend.release`) once the step's sampling is
    done, so they never add to the update's memory. With no version pushed yet, or outside `reusing`, every FastStep builds
    its own (the default of every other sampler caller: evaluation, benchmarks, tests). A
    build is also redone when a source tensor was replaced (moved, re-loaded by assignment,
    another module), and never kept for FSDP-sharded models (a full unsharded copy held
    between rollouts would undo the sharding)."""

    def __init__(self) -> None:
        self.version: int | None = None
        self.built: dict[tuple, tuple[Any, tuple, Any]] = {}  # key -> (body, sources, weights)
        self.builds = 0  # weight builds so far (what reuse saves is counted against this)

    def set_version(self, version: int | None) -> None:
        """The weights are now those of `version`: anything built for another is dropped."""
        if version is None or version != self.version:
            self.built.clear()
        self.version = version

    def get(self, key: tuple, body: Any, sources: tuple, build: Callable[[], Any]) -> Any:
        """`build()`'s result for `body` under `key`, reused while the version and the source
        tensors (`sources`: `weight_sources`) are the ones it was built from."""
        hit = self.built.get(key)
        if self.version is not None and hit is not None and hit[0] is body and hit[1] == sources:
            return hit[2]
        self.built.pop(key, None)  # free the old copies before building the new ones
        self.builds += 1
        out = build()
        if self.version is not None:
            self.built[key] = (body, sources, out)
        return out


def weight_sources(body: Any, head: Any) -> tuple:
    """(data_ptr, dtype, shape) of every tensor FastStep copies: a replaced tensor changes it
    (an in-place write does not; that is what the version is for)."""
    mods = [m for layer in body.layers for m in (layer.self_attn, layer.mlp)]
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lins = [getattr(m, n) for m in mods for n in names if hasattr(m, n)]
    lins += [head] if type(head) is nn.Linear else []
    ts = [t for lin in lins for t in (lin.weight, lin.bias) if t is not None]
    return tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in ts)


_STORE: ContextVar[DecodeWeights | None] = ContextVar("grpo_ar_decode_weights", default=None)


def active_store() -> DecodeWeights | None:
    """The store of the innermost `reusing` scope, or None outside one."""
    return _STORE.get()


@contextlib.contextmanager
def reusing(store: DecodeWeights) -> Iterator[DecodeWeights]:
    """Sample calls inside take FastStep weights from `store` (built once per its version)."""
    token = _STORE.set(store)
    try:
        yield store
    finally:
        _STORE.reset(token)
