"""The seed's GRPO loop, nothing modality-specific: sample groups, score, normalise, then μ
optimizer passes of grad-accumulated micro-batches through the core registries.

The same loop runs under torchrun (grpo_ar/parallel/ddp.py): each rank samples and scores its
share of the prompts, all ranks then hold the global rollout (advantages and batch statistics
as in one process) and train on their share with global normalisers."""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from ..adapters.base import Adapter
from ..config.run import Config, config_to_dict, save_config, with_sampling
from ..core import ADVANTAGES, AGGREGATIONS, compute_advantages
from ..core.aggregation import BatchTotals
from ..core.corrections import micro_batch_entropy_bonus
from ..errors import ConfigError
from ..finetune import build_finetune
from ..finetune.base import Finetune
from ..generation.async_backend import OneStepAhead
from ..generation.backends import (
    RolloutBackend,
    build_backend,
    record_sampler_gap,
    with_rollout_defaults,
)
from ..generation.packing import set_packing
from ..io.data import PromptSampler
from ..io.run_files import append_metrics, append_samples, progress
from ..io.trackers import Trackers, start_trackers
from ..parallel import build_parallel
from ..parallel.ddp import Parallel, derive_seed
from ..rewards import RewardComputer, RewardContext, build_rewards, reward_metrics
from ..rewards.base import RewardResult
from ..types import Entry, PromptBatch, Rollout
from .dynamic_sampling import fill_batch
from .environments import assign_credit, rollout_sums
from .evaluation import evaluate_rewards, reward_context
from .precision import Precision
from .preflight import clear_run, refuse_held_run
from .reference import REFERENCE_REFRESH, Reference
from .run_state import resume_trainer, save_trainer, trainer_state
from .step import (
    StepStats,
    bf16_peak,
    build_optimizer,
    build_scheduler,
    check_reward_failures,
    disable_dropout,
    entropy_controller,
    memory_metrics,
    mfu,
    token_terms,
    zero_std_fraction,
)

log = logging.getLogger("grpo_ar")


class Trainer:
    """GRPO over any adapter. `train()` runs `config.trainer.steps` steps.

    What is trained follows `config.finetune` (the whole model, a peft adapter or a LyCORIS
    network; grpo_ar/finetune/base.py) unless a built `finetune` is passed; `reference` overrides the
    KL reference it brings (a frozen copy, or the same model with the adapter off). Data
    parallelism follows `config.trainer.strategy` unless a `parallel` is passed; rollouts come
    from `config.rollout`'s backend unless a built `backend` is passed."""

    def __init__(
        self,
        config: Config,
        model: torch.nn.Module,
        adapter: Adapter,
        train_entries: Sequence[Entry],
        eval_entries: Sequence[Entry] | None = None,
        rewards: RewardComputer | None = None,
        reference: Reference | None = None,
        finetune: Finetune | None = None,
        parallel: Parallel | None = None,
        backend: RolloutBackend | None = None,
    ) -> None:
        config = with_rollout_defaults(config)  # e.g. IS correction for a bf16 engine
        t, a = config.trainer, config.algorithm
        if t.threads:
            torch.set_num_threads(t.threads)
        if finetune is None:
            want_ref = a.beta > 0 and reference is None
            finetune = build_finetune(model, config.finetune, want_ref, seed=t.seed)
        config = with_sampling(config, adapter.sampling)  # config.yaml: what is used
        self.cfg, self.adapter = config, adapter
        self.finetune, self.model = finetune, finetune.model
        if config.model.disable_dropout:  # training log-probs must match the sampler's
            disable_dropout(self.model)
        self.train_entries, self.eval_entries = list(train_entries), list(eval_entries or [])
        self.device = next(self.model.parameters()).device
        self.precision = Precision(config.model.precision, self.device)
        # on an accelerator a finiteness check per micro-batch would stall its queue: checked
        # once per pass there (a NaN micro-batch then still runs its backward; the pass is
        # skipped all the same); on the CPU a check is free and saves that backward
        self.sync_free = self.device.type != "cpu"
        self.peak = bf16_peak(self.device)  # perf/mfu's denominator (None: not reported)
        self.dist = parallel if parallel is not None else build_parallel(t.strategy, self.device)
        self.dist.check(config)
        everything = self.train_entries + self.eval_entries
        if rewards is None:  # builds and validates every reward the entries name, before any step
            rewards = build_rewards(config.data.reward_setup, everything)
        else:
            rewards.validate(everything)
        self.rewards = rewards
        self.prompts = PromptSampler(self.train_entries, t.batch_size, t.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(t.seed)
        self.refresh = REFERENCE_REFRESH[a.reference_refresh](
            mix_alpha=a.reference_mix_alpha, sync_every=a.reference_sync_every
        )
        self.reference: Reference | None = None
        if a.beta > 0:
            self.reference = reference if reference is not None else finetune.reference
            self.refresh.check(self.reference)  # e.g. an inexact TR-DPO mix, before any step
        self.entropy = entropy_controller(a)
        self.reference = self.dist.setup(self.model, adapter, self.reference)
        frozen = self.reference.module() if self.reference is not None else None
        for net in (self.model, frozen) if frozen is not None else (self.model,):
            set_packing(net, t.packing)  # the scoring passes' completion layout
        self.optimizer = build_optimizer(self.model, t)
        self.scheduler = build_scheduler(self.optimizer, t, total=t.steps * a.grpo_iters)
        self.step = 0
        self.saved_step = -1  # the step of the newest checkpoint this trainer wrote or loaded
        self.started = False  # train() was called: the run directory's files are this run's
        self.updates = 0  # optimizer steps taken (skipped ones not counted)
        # bumped wherever the policy's weights change (optimizer step, checkpoint load); the
        # rollout backend keys what it built from the weights on it (backends.py `sync`)
        self.weights_version = 0
        self.bonus_on = a.entropy_coef > 0 or a.entropy_target is not None
        self.run_dir = Path(config.log.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.trackers = Trackers()  # started by train(), on rank 0 only
        # the rollout engine (grpo_ar/generation/backends.py), refused here if it cannot sample
        # what config.sampling asks for
        if backend is None:
            backend = build_backend(config.rollout, adapter, self.model, finetune, config)
        else:
            backend.check(adapter.sampling)
        self.backend = backend
        if config.rollout.async_steps and self.dist.active:
            raise ConfigError(
                "rollout.async_steps = 1 runs in one process; set it to 0 under torchrun"
            )

    # -- one GRPO step ---------------------------------------------------------------------
    def generate(self, entries: Sequence[Entry], stats: StepStats) -> Rollout:
        """Sample groups, decode, score; returns the rollout with advantages in `data`."""
        a = self.cfg.algorithm
        with stats.timer("weight_sync"):  # the backend samples from the current policy
            self.backend.sync(self.model, self.weights_version)
        rollout, result = self._sample_and_score(entries, stats)
        if a.dynamic_sampling:
            rollout, result = self._dynamic_sampling(rollout, result, stats)
        with stats.timer("reward"):
            inputs = self._advantage_inputs(rollout.prompts, rollout, result, stats)
        self.backend.release()  # the step's last sampling (ReMax's greedy pass) is done
        adv, valid = compute_advantages(
            a.advantage,
            result.total.to(self.device),
            a.group_size,
            multi_objective=a.multi_objective,
            **inputs,
            **a.advantage_args,
        )
        adv = assign_credit(rollout, adv, a.group_size)  # (N, T) under per-turn credit
        rollout.data.update(adv=adv, valid=valid)
        rollout.extras["reward"] = result
        stats.update(reward_metrics(result))
        for name, (total, count) in rollout_sums(rollout).items():  # turns, tool use
            stats.add_sums(name, total, count)  # summed over ranks: the global batch's
        stats.update({"reward/zero_std_groups": zero_std_fraction(result.total, a.group_size)})
        return rollout

    def _sample_and_score(
        self, entries: Sequence[Entry], stats: StepStats, round_: int = 0
    ) -> tuple[Rollout, RewardResult]:
        """The global rollout and rewards of `entries` (each rank samples its share)."""
        with stats.timer("sample"):
            prompts = self.adapter.encode(entries).to(self.device)
        # noise from (seed, step, round): the same on every rank and in one process, however
        # long each rank sampled before
        self.generator.manual_seed(derive_seed(self.cfg.trainer.seed, self.step, round_))
        g = self.cfg.algorithm.group_size
        return self.dist.scored(prompts, lambda p: self._rollout(p, g, stats), self._pad())

    def _rollout(
        self, prompts: PromptBatch, g: int, stats: StepStats, greedy: bool = False
    ) -> tuple[Rollout, RewardResult]:
        with stats.timer("sample"), self.dist.sampling() as net, self.precision.autocast():
            gen = self.generator
            rollout = self.backend.generate(net, prompts, g, generator=gen, greedy=greedy)
        with stats.timer("reward"):
            outputs = self.adapter.decode(rollout)
            result = self.rewards(outputs, self._reward_context(rollout, g))
        check_reward_failures(result, self.cfg.data.reward_max_failed_frac, self.rewards, self.step)
        rollout.extras["outputs"] = outputs
        return rollout, result

    def _pad(self) -> int:
        return self.adapter.sampling.pad_token_id or 0

    def _dynamic_sampling(
        self, rollout: Rollout, result: RewardResult, stats: StepStats
    ) -> tuple[Rollout, RewardResult]:
        """DAPO's dynamic sampling (grpo_ar/train/dynamic_sampling.py)."""
        a, rounds = self.cfg.algorithm, itertools.count(1)
        draw = lambda: self._sample_and_score(self.prompts.next_batch(), stats, next(rounds))  # noqa: E731
        rollout, result, info = fill_batch(
            rollout, result, a.group_size, a.dynamic_sampling_max_rounds, draw, self._pad()
        )
        stats.update(info)
        return rollout, result

    def _reward_context(self, rollout: Rollout, group_size: int) -> RewardContext:
        return reward_context(self.adapter, rollout, group_size, self.step)

    def _advantage_inputs(
        self, prompts: PromptBatch, rollout: Rollout, result: RewardResult, stats: StepStats
    ) -> dict[str, Tensor]:
        """What the estimator takes beyond rewards: per-reward components (GDPO), completion
        lengths (OPO), the reward of one greedy rollout per prompt (ReMax)."""
        a = self.cfg.algorithm
        takes = ADVANTAGES.takes(a.advantage)
        out: dict[str, Tensor] = {}
        if a.multi_objective != "sum_then_normalize":
            out["components"] = result.components.to(self.device)
            out["weights"] = result.weights.to(self.device)
        if "lengths" in takes:
            out["lengths"] = rollout.lengths.to(self.device)
        if "subgroups" in takes and "tree_subgroups" in rollout.data:  # tree sampling's
            out["subgroups"] = rollout.data["tree_subgroups"].to(self.device)
        if "baseline" in takes:  # ReMax: the greedy completion's reward is the baseline
            greedy = lambda p: self._rollout(p, 1, stats, greedy=True)  # noqa: E731
            _, base = self.dist.scored(prompts, greedy, self._pad())
            out["baseline"] = base.total.to(self.device)
            stats.update({"reward/greedy_baseline": float(base.total.nanmean())})
        return out

    def update(self, rollout: Rollout, stats: StepStats) -> None:
        """μ optimizer passes over this rank's share of the rollout."""
        micro, totals = self.prepare(rollout, stats)
        total: Tensor | float
        with stats.timer("update"):
            self.model.train()
            for it in range(self.cfg.algorithm.grpo_iters):
                self.optimizer.zero_grad(set_to_none=True)
                finite, total = True, 0.0
                finite_t = torch.ones((), dtype=torch.bool, device=self.device)
                for i, mb in enumerate(micro):
                    with self.dist.no_sync(i < len(micro) - 1):  # sync once per pass
                        with self.precision.autocast():
                            logp, ent = self.dist.score(mb)
                        logp, ent = logp.float(), ent.float()  # losses in fp32 (mixed)
                        loss = self.micro_loss(mb, logp, ent, it, totals, len(micro), stats)
                        finite_t = finite_t & torch.isfinite(loss.detach())
                        if not self.sync_free:
                            finite = bool(finite_t)
                            if not finite and not self.dist.active:
                                break  # ranks keep going: each must join every gradient exchange
                        # ranks' gradients are averaged: × world size sums them
                        self.precision.backward(loss * self.dist.size)
                    total = total + loss.detach()
                self.end_pass(bool(finite_t) if self.sync_free else finite, total, stats)

    def prepare(self, rollout: Rollout, stats: StepStats) -> tuple[list[Rollout], BatchTotals]:
        """This rank's micro-batches of a global rollout (reference log-probs, loss masks) and
        the loss normalisers of the whole batch: (tokens, sequences, max_new_tokens)."""
        t = self.cfg.trainer  # clip_cov's draws: per rank, from the run seed
        self.generator.manual_seed(derive_seed(t.seed, self.step, -1 - self.dist.rank))
        micro = self.dist.local(rollout).micro_batches(t.grad_accum, t.micro_batch_tokens or None)
        micro = self.dist.align(micro)
        if self.reference is not None:
            with stats.timer("reference"), self.precision.autocast():
                for mb in micro:
                    mb.data["ref_logp"] = self.reference.logprobs(self.adapter, mb).float()
        for mb in micro:
            mb.data["loss_mask"] = self._loss_mask(mb)
        n_tokens = self._loss_mask(rollout).sum()
        return micro, BatchTotals(n_tokens, len(rollout), self.cfg.sampling.max_new_tokens)

    def micro_loss(
        self,
        mb: Rollout,
        logp: Tensor,
        ent: Tensor,
        it: int,
        totals: BatchTotals,
        n_micro: int,
        stats: StepStats,
    ) -> Tensor:
        """A micro-batch's part of the pass loss; parts over micro-batches and ranks sum to the
        full-batch loss. Pass `it` 0 runs the sampling policy itself: old = sg(logp)."""
        a = self.cfg.algorithm
        if it == 0:
            mb.data["old_logp"] = logp.detach()
            if self.backend.name != "builtin":
                record_sampler_gap(stats, logp, mb.sampling_logp, mb.data["loss_mask"])
        mask = mb.data["loss_mask"]
        terms = token_terms(a, mb, logp, ent, mask, self.generator)
        loss = AGGREGATIONS[a.aggregation](terms.loss, mask, *totals)
        if self.bonus_on:  # loss - coef·H over the tokens the policy term acts on
            eff = terms.entropy_keep
            bonus = micro_batch_entropy_bonus(
                ent,
                eff,
                total_tokens=totals.tokens,
                n_micro=n_micro,
                top_entropy_quantile=a.top_entropy_quantile,
            )
            loss = loss - self.entropy.coef * bonus
            self.entropy.observe((ent.detach() * eff).sum(), eff.sum())
        if self.sync_free:
            stats.add_terms(terms, ent, mask, keep=torch.isfinite(loss.detach()))
        elif torch.isfinite(loss):
            stats.add_terms(terms, ent, mask)
        return loss

    def end_pass(self, finite: bool, total: Tensor | float, stats: StepStats) -> None:
        """After a pass's backwards: the optimizer step (skipped on every rank if any rank saw
        a non-finite loss), the pass loss summed over ranks, the entropy controller."""
        finite = self.dist.all_true(finite)
        if finite:
            stats.add_scalar("loss", self.dist.sum(torch.as_tensor(total, device=self.device)))
        self._optimizer_step(finite, stats)
        if self.bonus_on:
            self.entropy.step(reduce=self.dist.sum if self.dist.active else None)
            stats.add_scalar("entropy_coef", self.entropy.coef)

    def _loss_mask(self, mb: Rollout) -> Tensor:
        mask = mb.model_mask  # environment tokens of multi-turn rollouts are attended, not trained
        if self.cfg.algorithm.mask_truncated_completions:  # DAPO: cut-off answers teach nothing
            mask = mask * (~mb.truncated).unsqueeze(-1).to(mask.dtype)
        return mask

    def _optimizer_step(self, finite: bool, stats: StepStats) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.tensor(0.0)
        if finite:
            self.precision.unscale(self.optimizer)  # fp16-mixed: clip the true gradients
            max_norm = self.cfg.trainer.max_grad_norm or math.inf
            norm = self.dist.full(torch.nn.utils.clip_grad_norm_(params, max_norm))
            finite = bool(torch.isfinite(norm))
        if not finite:  # never a NaN update: drop this pass, keep the run
            self.optimizer.zero_grad(set_to_none=True)
            self.precision.skipped()
            stats.count("skipped_updates")
            log.warning("step %d: non-finite loss or gradient; update skipped", self.step)
        else:
            self.precision.step(self.optimizer)
            self.weights_version += 1
            self.scheduler.step()
            self.updates += 1
            stats.add_scalar("grad_norm", norm)
            if self.reference is not None:
                self.refresh.after_update(self.reference, self.model, self.updates)

    def train_step(self) -> dict[str, float]:
        """One GRPO step: sample and score a batch of groups, μ optimizer passes; its metrics."""
        stats = StepStats()
        start = time.perf_counter()
        rollout = self.generate(self.prompts.next_batch(), stats)
        if self.cfg.rollout.async_steps:  # the next step's rollout samples while this one trains
            seed = derive_seed(self.cfg.trainer.seed, self.step + 1, 0)
            g = self.cfg.algorithm.group_size
            ahead = cast(OneStepAhead, self.backend)  # build_backend wraps it when async_steps
            ahead.prefetch_next(self.adapter, self.prompts, self.device, seed, g)
        self.update(rollout, stats)
        return self.finish_step(rollout, stats, start)

    def finish_step(self, rollout: Rollout, stats: StepStats, start: float) -> dict[str, float]:
        """After a step's updates: step count, iteration end, metrics, samples (rank 0)."""
        self.last_rollout = rollout
        self.step += 1
        if self.step % self.cfg.trainer.steps_per_iteration == 0:
            self.end_iteration()
        metrics = stats.summary(self.dist.reduce_tokens)
        n_tok = float(rollout.completion_mask.sum())
        metrics.update(
            {
                "step": self.step,
                "lr": float(self.scheduler.get_last_lr()[0]),
                "completion/length_mean": n_tok / len(rollout),
                "completion/length_max": float(rollout.lengths.max()),
                "completion/truncated": float(rollout.truncated.float().mean()),
                "time/step": time.perf_counter() - start,
                "tokens_per_s": n_tok / max(stats.times.get("sample", 0.0), 1e-9),
                **memory_metrics(self.device),
            }
        )
        # each of μ passes scores the prompt (once per row) and completion tokens of this rank
        passes = self.cfg.algorithm.grpo_iters
        scored = rollout.prompts.attention_mask.sum() * rollout.group_size + n_tok
        trained = float(scored) * passes / self.dist.size
        n_params = sum(p.numel() for p in self.model.parameters())
        metrics.update(mfu(n_params, trained, stats.times.get("update", 0.0), self.peak))
        if self.dist.is_main:
            k, save = self.cfg.log.samples_per_step, self.adapter.save_samples
            rows = append_samples(self.run_dir, rollout, self.step, k, save, self.adapter.summarize)
            self.trackers.log_samples(rows, self.step)
        return metrics

    def end_iteration(self) -> None:
        """The reference refresh policy's iteration hook, then reward hooks."""
        if self.reference is not None:
            self.refresh.after_iteration(self.reference, self.model)
        self.rewards.on_iteration_end(self.step)

    # -- the run -----------------------------------------------------------------------------
    def train(self) -> list[dict[str, float]]:
        """Run the remaining steps of `config.trainer.steps`: writes config.yaml (the sampling
        parameters actually used), metrics.jsonl, samples.jsonl and checkpoints under
        `config.log.run_dir`, evaluates on the held-out entries at the start and end (and every
        `eval_every` steps); returns each step's metrics."""
        t = self.cfg.trainer
        history: list[dict[str, float]] = []
        if self.step >= t.steps and self.saved_step == self.step:
            log.info("the run is complete (step %d of %d): nothing to do", self.step, t.steps)
            return history
        if self.dist.is_main and self.step == 0 and self.saved_step < 0 and not self.started:
            # a fresh run never appends its rows to an earlier run's
            clear_run(self.run_dir) if self.cfg.log.overwrite else refuse_held_run(self.run_dir)
        self.started = True
        if self.dist.is_main:
            save_config(self.cfg, self.run_dir / "config.yaml")
            # a tracker that cannot start fails here, before the first step
            self.trackers = start_trackers(self.cfg.log, self.run_dir, config_to_dict(self.cfg))
        if self.eval_entries and self.step == 0:
            self._log({"step": 0, **self.evaluate(self.eval_entries)})
        try:
            self._run_steps(history)
        except BaseException:
            self.trackers.close(failed=True)  # an MLflow / wandb run is not left "running"
            raise
        self.trackers.close()
        return history

    def _run_steps(self, history: list[dict[str, float]]) -> None:
        """The remaining steps, the final evaluation and the final save (see `train`)."""
        t = self.cfg.trainer
        show = self.cfg.log.progress and self.dist.is_main
        bar = progress(show, t.steps, self.step, self.cfg.log.progress_every)
        while self.step < t.steps:
            metrics = self.train_step()
            if (
                self.eval_entries
                and t.eval_every
                and self.step % t.eval_every == 0
                and self.step < t.steps
            ):
                metrics.update(self.evaluate(self.eval_entries))
            self._log(metrics)  # before the checkpoint: resume truncates rows after it
            if t.save_every and self.step % t.save_every == 0 and self.step < t.steps:
                self.save()  # the final step is saved once, below
            history.append(metrics)
            if bar is not None:
                bar.update(self.step, metrics)
        if bar is not None:
            bar.close()
        if self.eval_entries:
            self._log({"step": self.step, **self.evaluate(self.eval_entries)})
        self.save()

    def evaluate(
        self,
        entries: Sequence[Entry],
        greedy: bool = True,
        samples: int = 1,
        batch_size: int | None = None,
    ) -> dict[str, float]:
        """Mean reward (overall and per reward) on held-out entries, greedy or sampled."""
        limit = self.cfg.data.eval_size or len(entries)
        # every rank scores all entries (FSDP2: unsharded)
        with self.dist.sampling() as net, self.precision.autocast():
            return evaluate_rewards(
                net,
                self.adapter,
                self.rewards,
                list(entries)[:limit],
                greedy=greedy,
                samples=samples,
                batch_size=batch_size or self.cfg.data.eval_batch_size,
                seed=self.cfg.trainer.seed,
                step=self.step,
            )

    # -- outputs -----------------------------------------------------------------------------
    def _log(self, metrics: dict[str, float]) -> None:
        if self.dist.is_main:
            append_metrics(self.run_dir, metrics)
            self.trackers.log(metrics, int(metrics["step"]))

    def state_dict(self) -> dict[str, Any]:
        """The trainer state a checkpoint stores besides weights (grpo_ar/train/run_state.py)."""
        return trainer_state(self)

    def save(self) -> Path:
        """Policy weights (the whole model, or only the adapter), the reference's and the
        trainer state, atomically, under run_dir/checkpoints/step_N."""
        return save_trainer(self)

    def resume(self, run_dir: str | Path | None = None) -> None:
        """Continue from the newest checkpoint of `run_dir` (default: this run's)."""
        resume_trainer(self, run_dir or self.run_dir)
        self.weights_version += 1  # loaded in place: nothing built from the old weights holds
