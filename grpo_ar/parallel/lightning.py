"""PyTorch Lightning, the seed author's design (optional extra: pip install 'grpo-ar[lightning]').

- `GRPODataset`, an IterableDataset: for each GRPO step it draws the global batch (the run's
  seeded PromptSampler, the same on every rank), keeps this rank's share (Lightning does not
  split IterableDatasets) and yields `(batch index, sub index, GRPO iteration, entries)`
  μ × grad_accum times: the sub-batches of each of the μ passes.
- `GRPOModule`, a LightningModule with manual optimization. Its `training_step` computes the
  rollout cache once per batch index: every (batch, sub) sampled as a shard of the global batch,
  scored, advantages and batch statistics on the global batch, reference log-probs; all subs at
  the batch's first step, where the seed computed each sub lazily, because the loss normalisers
  (global token count) must be known before the first backward. On the first GRPO iteration the
  pass itself gives the old log-probs. It accumulates by hand (`manual_backward`, inside
  `block_backward_sync` for all but the last sub) and steps after the last sub.

Everything algorithmic is grpo_ar's own Trainer (`module.core`): sampling, rewards,
advantages, objective, aggregation, clipping, scheduler, reference refresh and checkpoints
(`module.core.save()` / `module.core.resume(run_dir)` before `fit`), so a Lightning run equals
the plain trainer's steps. Use `strategy="ddp"` (CPU or GPU) and `enable_checkpointing=False`
(grpo_ar writes its own checkpoints); the dataset's length is the run: no max_steps needed.

    module = GRPOModule(config, model, adapter, entries)
    L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
              enable_checkpointing=False).fit(module)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from ..adapters.base import Adapter
from ..config.run import Config, config_to_dict, save_config
from ..errors import ConfigError
from ..io.trackers import start_trackers
from ..train.step import StepStats
from ..train.trainer import Trainer
from ..types import Entry
from .ddp import DataParallel, Parallel, shard_rows, world_size

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - the extra is missing
    raise ImportError(
        "grpo_ar.parallel.lightning needs the optional extra: pip install 'grpo-ar[lightning]'"
    ) from e

Item = tuple[int, int, int, list[Entry]]


class GRPODataset(IterableDataset):
    """`(batch index, sub index, GRPO iteration, this rank's entries of the sub-batch)` for the
    steps `core` has left, μ × grad_accum items per step; every rank yields as many."""

    def __init__(self, core: Trainer) -> None:
        self.core = core
        self.batches: dict[int, list[Entry]] = {}  # global batches not yet trained on

    def __len__(self) -> int:
        t, a = self.core.cfg.trainer, self.core.cfg.algorithm
        return (t.steps - self.core.step) * a.grpo_iters * t.grad_accum

    def __iter__(self) -> Iterator[Item]:
        core = self.core
        t, a = core.cfg.trainer, core.cfg.algorithm
        for b in range(core.step, t.steps):
            batch = core.prompts.next_batch()  # the run's sampler: resumable with the run
            self.batches[b] = batch
            first, count = shard_rows(len(batch), core.dist.rank, core.dist.size)
            mine, per = batch[first : first + count], count // t.grad_accum
            for it in range(a.grpo_iters):
                for sub in range(t.grad_accum):
                    yield b, sub, it, mine[sub * per : (sub + 1) * per]


class GRPOModule(pl.LightningModule):
    """GRPO as a LightningModule (manual optimization) over grpo_ar's Trainer (`self.core`);
    the constructor takes the Trainer's arguments. `history` holds each step's metrics."""

    def __init__(
        self,
        config: Config,
        model: torch.nn.Module,
        adapter: Adapter,
        train_entries: Sequence[Entry],
        **trainer_kwargs: Any,
    ) -> None:
        super().__init__()
        if config.trainer.micro_batch_tokens:
            raise ConfigError(
                "trainer.micro_batch_tokens: the Lightning design splits each batch into "
                "grad_accum equal sub-batches; use trainer.grad_accum"
            )
        self.automatic_optimization = False
        # one process until Lightning has set up its process group (see `setup`)
        self.core = Trainer(
            config, model, adapter, train_entries, parallel=Parallel(), **trainer_kwargs
        )
        self.model = self.core.model  # registered: Lightning moves and wraps it
        self.dataset = GRPODataset(self.core)
        self.history: list[dict[str, float]] = []
        self._bid: int | None = None

    def setup(self, stage: str) -> None:
        if world_size() > 1:  # sharded sampling and the global exchange over Lightning's group
            par = DataParallel()
            self.core.reference = par.setup(self.core.model, self.core.adapter, self.core.reference)
            par.check(self.core.cfg)
            self.core.dist = par

    def on_fit_start(self) -> None:
        core, device = self.core, self.device
        core.device = device
        if core.generator.device != device:
            core.generator = torch.Generator(device=device)
        frozen = None if core.reference is None else core.reference.module()
        if frozen is not None:  # a FrozenCopy is not a submodule: Lightning would not move it
            frozen.to(device)
        if core.dist.is_main:
            save_config(core.cfg, core.run_dir / "config.yaml")
            core.trackers = start_trackers(core.cfg.log, core.run_dir, config_to_dict(core.cfg))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=None)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, idx: int) -> Any:
        return batch  # entries are not tensors: the module encodes them itself

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.core.optimizer  # stepped by the core (clipping, skips, scheduler)

    # -- the seed's training_step -----------------------------------------------------------
    def _cache(self, bid: int) -> None:
        """The batch's rollout (global), this rank's sub micro-batches and the normalisers."""
        core = self.core
        self._stats, self._start = StepStats(), time.perf_counter()
        self._rollout = core.generate(self.dataset.batches.pop(bid), self._stats)
        self._micro, self._totals = core.prepare(self._rollout, self._stats)
        self._bid = bid

    def training_step(self, batch: Item, batch_idx: int) -> torch.Tensor:
        bid, sub, it, entries = batch
        core = self.core
        if bid != self._bid:
            self._cache(bid)
        mb, last = self._micro[sub], sub == len(self._micro) - 1
        if not core.cfg.algorithm.dynamic_sampling:  # dynamic sampling swaps groups in
            assert list(mb.prompts.entries) == list(entries), "sub-batch order diverged"
        if sub == 0:
            core.optimizer.zero_grad(set_to_none=True)
            self._finite = True
            self._total: torch.Tensor | float = 0.0
        self.model.train()
        block = getattr(self.trainer.strategy, "block_backward_sync", None)  # parallel ones
        sync = contextlib.nullcontext() if last or block is None else block()
        with sync:
            logp, ent = core.dist.score(mb)
            loss = core.micro_loss(mb, logp, ent, it, self._totals, len(self._micro), self._stats)
            self._finite = self._finite and bool(torch.isfinite(loss))
            # Lightning's DDP averages gradients over ranks: × world size sums them
            self.manual_backward(loss * core.dist.size)
        self._total = self._total + loss.detach()
        if last:
            core.end_pass(self._finite, self._total, self._stats)
            if it == core.cfg.algorithm.grpo_iters - 1:
                self._finish_step()
        return loss.detach()

    def _finish_step(self) -> None:
        core = self.core
        metrics = core.finish_step(self._rollout, self._stats, self._start)
        t = core.cfg.trainer
        if t.save_every and core.step % t.save_every == 0:
            core.save()
        core._log(metrics)
        self.history.append(metrics)
        shown = ("loss", "reward/mean", "kl", "entropy")
        self.log_dict({k: float(metrics[k]) for k in shown if k in metrics}, rank_zero_only=True)
        self._bid = None

    def on_train_end(self) -> None:
        self.core.save()
        self.core.trackers.close()
