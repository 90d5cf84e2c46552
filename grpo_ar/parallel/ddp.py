"""Data parallelism on PyTorch's own engine (torchrun + `torch.distributed`), equal to one process.

One process per device. Every rank draws the same global prompt batch (same seed), encodes it,
samples only its contiguous share of whole groups (`prompts.extras["shard"]`: the sampler draws
the global batch's noise and keeps its slice), decodes and scores it, then all ranks exchange
their rollouts and rewards (small next to the model) so each holds the global rollout: dynamic
sampling, advantages and every batch statistic are computed on the global batch, exactly as in
one process. Each rank then trains on its share; the aggregations take the global token and
sequence counts, and the gradients are summed over ranks, so the update is the one-process one.

- `Parallel`: one process (every hook is the identity).
- `DataParallel`: the exchange over an initialised process group, no model wrapping (the
  Lightning integration: Lightning wraps the module itself).
- `DDPParallel`: + `DistributedDataParallel` around a `ScoreNet` (the training forward);
  sampling runs the unwrapped model under no_grad (per-rank lengths are fine).
- `FSDP2Parallel`: + `fully_shard` of each decoder layer, then of the `ScoreNet` root; sampling
  unshards every module once around the sampler (no collective while ranks generate different
  lengths), so it cannot hang. Checkpoints gather full state dicts.

A rank whose local work (sampling, decoding, rewards) raises does not leave the others waiting:
the exchange carries the error, and every rank raises it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import ConfigError, RunError
from ..types import PromptBatch, Rollout

if TYPE_CHECKING:
    from ..adapters.base import Adapter
    from ..config.run import Config
    from ..finetune.base import Finetune

STRATEGIES = ("auto", "none", "ddp", "fsdp2")


def derive_seed(seed: int, step: int, stream: int = 0) -> int:
    """The generator seed of one draw stream of a step: sampling round r is stream r, the
    update's draws stream -1 - rank. Linear in the step (as PromptSampler's epochs), so step 0's
    first sampling round draws from the run seed itself, as before streams existed."""
    return (int(seed) + 1_000_003 * int(step) + int(stream)) % 2**63


def launched() -> bool:
    """Started by torchrun (or any launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> torch.device:
    """Join the torchrun process group (nccl on CUDA, gloo on CPU) and return this rank's
    device: `cuda:LOCAL_RANK` when CUDA is used, else cpu. `timeout_s` bounds every collective
    (trainer.dist_timeout_s), so a stopped or hanging rank ends the job with an error."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    where = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(where)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    return where


def resolve_strategy(name: str) -> str:
    """auto -> ddp with more than one process, else none; refuses a wrapper without torchrun."""
    if name not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={name!r}: use {', '.join(STRATEGIES)}")
    many = world_size() > 1 or launched()
    if name == "auto":
        return "ddp" if many else "none"
    if name == "none" and many:
        raise ConfigError(
            "trainer.strategy=none with several processes would train unsynchronised copies: "
            "use ddp or fsdp2 (or auto)"
        )
    if name != "none" and not (dist.is_initialized() or "WORLD_SIZE" in os.environ):
        raise ConfigError(
            f"trainer.strategy={name} needs torchrun: torchrun --nproc_per_node=N -m "
            "grpo_ar.cli train CONFIG (or strategy=none for one process)"
        )
    return name


class ScoreNet(nn.Module):
    """The training forward as one module call (`adapter.token_logprobs(model, rollout)`), so
    DDP's and FSDP2's forward hooks wrap the scorer's fast paths (shared prompt prefix, fused
    LM head), which call the model's body and head directly."""

    adapter: Adapter  # in __dict__, not a submodule

    def __init__(self, model: nn.Module, adapter: Adapter) -> None:
        super().__init__()
        self.model = model
        self.__dict__["adapter"] = adapter  # not a module

    def forward(self, rollout: Rollout, with_entropy: bool = False) -> tuple[Tensor, Any]:
        return self.adapter.token_logprobs(self.model, rollout, with_entropy=with_entropy)


# -- one process ------------------------------------------------------------------------------
class Parallel:
    """One process: every hook is the identity."""

    name = "none"
    rank, size = 0, 1

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self, model: nn.Module, adapter: Adapter, reference: Any) -> Any:
        """Wrap the model for training; returns the reference to use (maybe sharded too)."""
        self.model, self.adapter = model, adapter
        return reference

    def check(self, cfg: Config) -> None:
        """Raise on settings this strategy cannot run equal to one process."""

    def score(self, rollout: Rollout, with_entropy: bool = True) -> tuple[Tensor, Any]:
        """The differentiable training forward of a micro-batch."""
        return self.adapter.token_logprobs(self.model, rollout, with_entropy=with_entropy)

    @contextlib.contextmanager
    def sampling(self) -> Iterator[nn.Module]:
        """The module to sample (or evaluate) with, in eval mode."""
        self.model.eval()
        yield self.model

    def no_sync(self, skip: bool) -> contextlib.AbstractContextManager[None]:
        """No gradient synchronisation in this backward (all but the last micro-batch)."""
        return contextlib.nullcontext()

    def scored(
        self, prompts: PromptBatch, fn: Callable[[PromptBatch], tuple[Rollout, Any]], pad: int
    ) -> tuple[Rollout, Any]:
        """`fn(this rank's prompts) -> (rollout, reward result)`, joined over ranks."""
        return fn(prompts)

    def local(self, rollout: Rollout) -> Rollout:
        """This rank's share (whole groups) of a global rollout."""
        return rollout

    def align(self, micro: list[Rollout]) -> list[Rollout]:
        """Micro-batches made to run the same forwards on every rank (FSDP2)."""
        return micro

    def sum(self, x: Tensor) -> Tensor:
        return x

    def all_true(self, flag: bool) -> bool:
        return flag

    def full(self, x: Tensor) -> Tensor:
        """A sharded tensor (FSDP2's gradient norm) gathered; others as they are."""
        return x

    def barrier(self) -> None:
        pass

    def reduce_tokens(self, sums: dict[str, list[Tensor]]) -> dict[str, list[Tensor]]:
        """Token statistics (name -> [Σ x, count]) summed over ranks."""
        return sums

    # checkpoints: the single-process formats
    def policy_weights(self, finetune: Finetune) -> Any:
        return finetune.checkpoint_weights()

    def load_policy(self, finetune: Finetune, path: Path) -> None:
        finetune.load_checkpoint_weights(path)

    def reference_weights(self, reference: Any) -> Any:
        """A frozen copy's module, an adapter reference's frozen tensors (None while it is the
        base), or None without a reference."""
        if reference is None:
            return None
        module = reference.module()
        return module if module is not None else (reference.state_dict() or None)

    def load_reference(self, reference: Any, path: Path) -> None:
        from ..io.checkpoint import load_tensors, load_weights

        module = None if reference is None else reference.module()
        if module is not None:
            if path.exists():
                load_weights(module, path)
        elif reference is not None:  # adapter reference: no file = still the base
            reference.load_state_dict(load_tensors(path) if path.exists() else {})

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer(self, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
        optimizer.load_state_dict(dict(state))


# -- several processes --------------------------------------------------------------------------
def _move(x: Any, device: torch.device | str) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, list):
        return [_move(v, device) for v in x]
    if isinstance(x, dict):
        return {k: _move(v, device) for k, v in x.items()}
    return x


def move_rollout(r: Rollout, device: torch.device | str) -> Rollout:
    """The rollout (prompts, tensors, tensor extras such as video outputs) on `device`."""
    t = lambda x: None if x is None else x.to(device)  # noqa: E731
    return replace(
        r,
        prompts=r.prompts.to(device),
        completion_ids=r.completion_ids.to(device),
        completion_mask=r.completion_mask.to(device),
        sampling_logp=r.sampling_logp.to(device),
        truncated=r.truncated.to(device),
        prompt_index=r.prompt_index.to(device),
        group_ids=r.group_ids.to(device),
        span_ids=t(r.span_ids),
        data={k: v.to(device) for k, v in r.data.items()},
        extras=_move(dict(r.extras), device),
    )


def shard_rows(n: int, rank: int, size: int) -> tuple[int, int]:
    """(first, count) of this rank's rows of n (n divisible by size: groups are never split)."""
    if n % size:
        raise ConfigError(
            f"{n} prompts do not split over {size} processes: make trainer.batch_size a "
            f"multiple of the world size {size}"
        )
    per = n // size
    return rank * per, per


def shard_prompts(prompts: PromptBatch, first: int, count: int) -> PromptBatch:
    """Rows first..first+count, left padding kept as in the global batch (same numerics as one
    process), marked as a shard of it for the sampler."""
    rows = slice(first, first + count)
    cut = lambda t: None if t is None else t[rows]  # noqa: E731
    return replace(
        prompts,
        input_ids=prompts.input_ids[rows],
        attention_mask=prompts.attention_mask[rows],
        uncond_input_ids=cut(prompts.uncond_input_ids),
        uncond_attention_mask=cut(prompts.uncond_attention_mask),
        entries=list(prompts.entries[rows]),
        extras={**prompts.extras, "shard": (first, len(prompts))},
    )


class DataParallel(Parallel):
    """Sharded sampling and the exchange over the initialised process group; the model is not
    wrapped (for callers that wrap it themselves, e.g. Lightning)."""

    name = "data"

    def __init__(self) -> None:
        if not dist.is_initialized():
            raise RuntimeError("no torch.distributed process group: launch with torchrun")
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def check(self, cfg: Config) -> None:
        t = cfg.trainer
        first, per = shard_rows(t.batch_size, 0, self.size)
        if not t.micro_batch_tokens and per % t.grad_accum:
            raise ConfigError(
                f"trainer.batch_size={t.batch_size} over {self.size} processes leaves {per} "
                f"prompts per process, not divisible by trainer.grad_accum={t.grad_accum}"
            )

    def scored(
        self, prompts: PromptBatch, fn: Callable[[PromptBatch], tuple[Rollout, Any]], pad: int
    ) -> tuple[Rollout, Any]:
        from ..train.batching import concat_results, concat_rollouts

        first, count = shard_rows(len(prompts), self.rank, self.size)
        error: BaseException | None = None
        try:
            rollout, result = fn(shard_prompts(prompts, first, count))
            payload: tuple = (None, move_rollout(rollout, "cpu"), result)
        except Exception as e:  # every rank must reach the exchange, or the others hang
            why = str(e) if isinstance(e, RunError) else f"{type(e).__name__}: {e}"
            error, payload = e, (why, None, None)
        parts: list[Any] = [None] * self.size
        dist.all_gather_object(parts, payload)
        failed = [(r, p[0]) for r, p in enumerate(parts) if p[0] is not None]
        if error is not None:
            raise error
        if failed:
            rank, msg = failed[0]
            raise RunError(f"rank {rank} failed while sampling or scoring: {msg}")
        rollouts = [p[1] for p in parts]
        joined = concat_rollouts(rollouts, pad)
        joined.extras = {k: v for k, v in rollouts[0].extras.items() if k != "outputs"}
        if "outputs" in rollouts[0].extras:
            joined.extras["outputs"] = [o for r in rollouts for o in r.extras["outputs"]]
        device = prompts.input_ids.device
        joined = move_rollout(replace(joined, prompts=prompts.to("cpu")), device)
        return joined, concat_results([p[2] for p in parts])

    def local(self, rollout: Rollout) -> Rollout:
        first, count = shard_rows(len(rollout.prompts), self.rank, self.size)
        g = rollout.group_size
        return rollout.select(list(range(first * g, (first + count) * g)))

    def sum(self, x: Tensor) -> Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    def all_true(self, flag: bool) -> bool:
        t = torch.tensor([0.0 if flag else 1.0], device=self._comm_device())
        dist.all_reduce(t)
        return bool(t.item() == 0)

    def barrier(self) -> None:
        dist.barrier()

    def reduce_tokens(self, sums: dict[str, list[Tensor]]) -> dict[str, list[Tensor]]:
        names: list[Any] = [None] * self.size
        dist.all_gather_object(names, sorted(sums))
        keys = sorted(set().union(*names))
        zero = [torch.zeros(()), torch.zeros(())]
        flat = torch.stack([torch.stack(sums.get(k, zero)).float() for k in keys] or [zero[0]])
        flat = self.sum(flat.reshape(-1).to(self._comm_device())).cpu()
        return {k: [flat[2 * i], flat[2 * i + 1]] for i, k in enumerate(keys)}

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if _nccl() else torch.device("cpu")


def _nccl() -> bool:
    return dist.get_backend() == "nccl"


class DDPParallel(DataParallel):
    """DistributedDataParallel around the training forward; sampling unwrapped under no_grad."""

    name = "ddp"

    def setup(self, model: nn.Module, adapter: Adapter, reference: Any) -> Any:
        from torch.nn.parallel import DistributedDataParallel as DDP

        super().setup(model, adapter, reference)
        # a model call other than the causal LM's runs part of the model (Janus' generation
        # path): a trained parameter it never reaches (`[janus_t2i] train` naming "vision") gets
        # no gradient, which DDP allows only when it looks for such parameters in each backward
        partial = adapter.call_name != "causal_lm"
        # no buffer broadcast: ranks may run different numbers of forwards (token budgets)
        self.net = DDP(
            ScoreNet(model, adapter), broadcast_buffers=False, find_unused_parameters=partial
        )
        return reference

    def score(self, rollout: Rollout, with_entropy: bool = True) -> tuple[Tensor, Any]:
        return self.net(rollout, with_entropy)

    def no_sync(self, skip: bool) -> contextlib.AbstractContextManager[None]:
        return self.net.no_sync() if skip else contextlib.nullcontext()
