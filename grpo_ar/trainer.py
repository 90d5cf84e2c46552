"""The seed's GRPO loop, nothing modality-specific: sample groups, score, normalise, then μ
optimizer passes of grad-accumulated micro-batches through the core registries."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import Config, save_config
from .core import ADVANTAGES, AGGREGATIONS, compute_advantages
from .core.corrections import AdaptiveEntropyCoef, entropy_bonus
from .core.objective import token_objective
from .data import Entry, PromptSampler
from .dynamic_sampling import fill_batch
from .evaluation import evaluate_rewards
from .finetune import Finetune, build_finetune
from .rewards import RewardComputer, RewardContext, build_rewards, reward_metrics
from .rollout import Rollout
from .run_io import append_metrics, append_samples, progress
from .run_state import resume_trainer, save_trainer, trainer_state
from .train_utils import (
    StepStats,
    build_optimizer,
    build_scheduler,
    disable_dropout,
    zero_std_fraction,
)

log = logging.getLogger("grpo_ar")


class Trainer:
    """GRPO over any adapter. `train()` runs `config.trainer.steps` steps.

    What is trained follows `config.finetune` (the whole model, a peft adapter or a LyCORIS
    network; grpo_ar/finetune.py) unless a built `finetune` is passed; `reference` overrides the
    KL reference it brings (a frozen copy, or the same model with the adapter off)."""

    def __init__(
        self,
        config: Config,
        model: torch.nn.Module,
        adapter: Any,
        train_entries: Sequence[Entry],
        eval_entries: Sequence[Entry] | None = None,
        rewards: RewardComputer | None = None,
        reference: Any | None = None,
        finetune: Finetune | None = None,
    ) -> None:
        t, a = config.trainer, config.algorithm
        if t.threads:
            torch.set_num_threads(t.threads)
        if finetune is None:
            want_ref = a.beta > 0 and reference is None
            finetune = build_finetune(model, config.finetune, want_ref, seed=t.seed)
        self.cfg, self.finetune, self.model, self.adapter = (
            config,
            finetune,
            finetune.model,
            adapter,
        )
        if config.model.disable_dropout:  # training log-probs must match the sampler's
            disable_dropout(self.model)
        self.train_entries, self.eval_entries = list(train_entries), list(eval_entries or [])
        self.device = next(self.model.parameters()).device
        everything = self.train_entries + self.eval_entries
        if rewards is None:  # builds and validates every reward the entries name, before any step
            rewards = build_rewards(config.data.reward_setup, everything)
        else:
            rewards.validate(everything)
        self.rewards = rewards
        self.prompts = PromptSampler(self.train_entries, t.batch_size, t.seed)
        self.generator = torch.Generator(device=self.device).manual_seed(t.seed)
        self.reference = None
        if a.beta > 0:
            self.reference = reference if reference is not None else finetune.reference
            if a.reference_refresh == "soft":  # refuse an inexact TR-DPO mix before any step
                self.reference.check_mix(a.reference_mix_alpha)
        self.entropy = AdaptiveEntropyCoef(
            a.entropy_coef,
            target=a.entropy_target if a.entropy_target is not None else 0.0,
            delta=a.entropy_coef_delta,
            coef_min=a.entropy_coef_min,
            coef_max=a.entropy_coef_max,
            adaptive=a.entropy_target is not None,
        )
        self.optimizer = build_optimizer(self.model, t)
        self.scheduler = build_scheduler(self.optimizer, t, total=t.steps * a.grpo_iters)
        self.step = 0
        self.updates = 0  # optimizer steps taken (skipped ones not counted)
        self.bonus_on = a.entropy_coef > 0 or a.entropy_target is not None
        self.run_dir = Path(config.log.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    # -- one GRPO step ---------------------------------------------------------------------
    def generate(self, entries: Sequence[Entry], stats: StepStats) -> Rollout:
        """Sample groups, decode, score; returns the rollout with advantages in `data`."""
        a = self.cfg.algorithm
        rollout, result = self._sample_and_score(entries, stats)
        if a.dynamic_sampling:
            rollout, result = self._dynamic_sampling(rollout, result, stats)
        with stats.timer("reward"):
            inputs = self._advantage_inputs(rollout.prompts, rollout, result, stats)
        adv, valid = compute_advantages(
            a.advantage,
            result.total.to(self.device),
            a.group_size,
            multi_objective=a.multi_objective,
            **inputs,
            **a.advantage_args,
        )
        rollout.data["adv"] = adv
        rollout.data["valid"] = valid
        rollout.extras["reward"] = result
        stats.update(reward_metrics(result))
        stats.update({"reward/zero_std_groups": zero_std_fraction(result.total, a.group_size)})
        return rollout

    def _sample_and_score(self, entries: Sequence[Entry], stats: StepStats) -> tuple[Rollout, Any]:
        g = self.cfg.algorithm.group_size
        with stats.timer("sample"):
            self.model.eval()
            prompts = self.adapter.encode(entries).to(self.device)
            rollout = self.adapter.sample(self.model, prompts, g, generator=self.generator)
        with stats.timer("reward"):
            outputs = self.adapter.decode(rollout)
            result = self.rewards(outputs, self._reward_context(rollout, g))
        rollout.extras["outputs"] = outputs
        return rollout, result

    def _dynamic_sampling(self, rollout: Rollout, result: Any, stats: StepStats) -> tuple:
        """DAPO's dynamic sampling (grpo_ar/dynamic_sampling.py)."""
        a = self.cfg.algorithm
        pad = getattr(self.adapter, "sampling", self.cfg.sampling).pad_token_id or 0
        draw = lambda: self._sample_and_score(self.prompts.next_batch(), stats)  # noqa: E731
        rollout, result, info = fill_batch(
            rollout, result, a.group_size, a.dynamic_sampling_max_rounds, draw, pad
        )
        stats.update(info)
        return rollout, result

    def _reward_context(self, rollout: Rollout, group_size: int) -> RewardContext:
        return RewardContext(
            rollout.entries,
            rollout.group_ids.tolist(),
            group_size,
            self.step,
            lengths=self.adapter.output_lengths(rollout),
        )

    def _advantage_inputs(
        self, prompts: Any, rollout: Rollout, result: Any, stats: StepStats
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
        if "baseline" in takes:  # ReMax: the greedy completion's reward is the baseline
            with torch.no_grad():
                greedy = self.adapter.sample(self.model, prompts, 1, greedy=True)
            base = self.rewards(self.adapter.decode(greedy), self._reward_context(greedy, 1))
            out["baseline"] = base.total.to(self.device)
            stats.update({"reward/greedy_baseline": float(base.total.nanmean())})
        return out

    def update(self, rollout: Rollout, stats: StepStats) -> None:
        """μ optimizer passes over the rollout; reference log-probs computed once."""
        a, t = self.cfg.algorithm, self.cfg.trainer
        micro = rollout.micro_batches(t.grad_accum, t.micro_batch_tokens or None)
        if self.reference is not None:
            with stats.timer("reference"):
                for mb in micro:
                    mb.data["ref_logp"] = self.reference.logprobs(self.adapter, mb)
        for mb in micro:
            mb.data["loss_mask"] = self._loss_mask(mb)
        n_tokens = sum(mb.data["loss_mask"].sum() for mb in micro)
        totals = (n_tokens, len(rollout), self.cfg.sampling.max_new_tokens)
        agg_fn = AGGREGATIONS[a.aggregation]
        with stats.timer("update"):
            self.model.train()
            for it in range(a.grpo_iters):
                self.optimizer.zero_grad(set_to_none=True)
                finite = True
                for mb in micro:
                    logp, ent = self.adapter.token_logprobs(self.model, mb, with_entropy=True)
                    # pass 1 runs the sampling policy itself: old = sg(logp), no extra forward
                    if it == 0:
                        mb.data["old_logp"] = logp.detach()
                    mask = mb.data["loss_mask"]
                    terms = self._objective(mb, logp, ent, mask)
                    loss = agg_fn(terms.loss, mask, *totals)
                    if self.bonus_on:  # loss - coef·H over the tokens the policy term acts on
                        eff = terms.entropy_keep
                        # the mean entropy over the tokens it acts on: global when every token
                        # counts; with an entropy mask TRL's per-micro-batch mean / accumulation
                        n_eff = n_tokens if a.top_entropy_quantile == 1 else eff.sum() * len(micro)
                        loss = loss - self.entropy.coef * entropy_bonus(ent, eff, n_eff)
                        self.entropy.observe((ent.detach() * eff).sum(), eff.sum())
                    if not torch.isfinite(loss):
                        finite = False
                        break
                    loss.backward()
                    self._log_terms(stats, loss, terms, ent, mask)
                self._optimizer_step(finite, stats)
                if self.bonus_on:
                    self.entropy.step()
                    stats.add_scalar("entropy_coef", self.entropy.coef)

    def _loss_mask(self, mb: Rollout) -> Tensor:
        mask = mb.completion_mask
        if self.cfg.algorithm.mask_truncated_completions:  # DAPO: cut-off answers teach nothing
            mask = mask * (~mb.truncated).unsqueeze(-1).to(mask.dtype)
        return mask

    def _objective(self, mb: Rollout, logp: Tensor, ent: Tensor | None, mask: Tensor) -> Any:
        a = self.cfg.algorithm
        return token_objective(
            logp,
            mb.data["old_logp"],
            mb.data["adv"],
            mask,
            loss=a.loss,
            loss_args=a.loss_args,
            ref_logp=mb.data.get("ref_logp"),
            beta=a.beta,
            kl=a.kl,
            kl_args=a.kl_args,
            kl_bias_correction=a.kl_bias_correction,
            sampling_logp=mb.sampling_logp,
            is_correction=a.is_correction,
            is_correction_args=a.is_correction_args,
            off_policy_mask_threshold=a.off_policy_mask_threshold,
            entropy=ent,
            top_entropy_quantile=a.top_entropy_quantile,
            generator=self.generator,
        )

    @staticmethod
    def _log_terms(stats: StepStats, loss: Tensor, terms: Any, ent: Tensor, mask: Tensor) -> None:
        stats.add_scalar("loss", loss.detach())
        stats.add_tokens("entropy", ent.detach(), mask)
        if terms.kl is not None:
            stats.add_tokens("kl", terms.kl.detach(), mask)
        stats.add_tokens("clip/low", terms.policy.clipped_low.expand_as(mask), mask)
        stats.add_tokens("clip/high", terms.policy.clipped_high.expand_as(mask), mask)
        stats.add_tokens("tokens/kept", terms.keep.expand_as(mask), mask)
        if terms.is_weight is not None:
            stats.add_tokens("is_weight", terms.is_weight.expand_as(mask), mask)

    def _optimizer_step(self, finite: bool, stats: StepStats) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.tensor(0.0)
        if finite:
            max_norm = self.cfg.trainer.max_grad_norm or math.inf
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            finite = bool(torch.isfinite(norm))
        if not finite:  # never a NaN update: drop this pass, keep the run
            self.optimizer.zero_grad(set_to_none=True)
            stats.count("skipped_updates")
            log.warning("step %d: non-finite loss or gradient; update skipped", self.step)
        else:
            self.optimizer.step()
            self.scheduler.step()
            self.updates += 1
            stats.add_scalar("grad_norm", norm)
            a = self.cfg.algorithm
            if (
                self.reference is not None
                and a.reference_refresh == "soft"
                and self.updates % a.reference_sync_every == 0
            ):  # TR-DPO (arXiv 2404.09656): π_ref <- α·π + (1 - α)·π_ref
                self.reference.mix(self.model, a.reference_mix_alpha)

    def train_step(self) -> dict[str, float]:
        stats = StepStats()
        start = time.perf_counter()
        rollout = self.generate(self.prompts.next_batch(), stats)
        self.update(rollout, stats)
        self.last_rollout = rollout
        self.step += 1
        if self.step % self.cfg.trainer.steps_per_iteration == 0:
            self.end_iteration()
        metrics = stats.summary()
        n_tok = float(rollout.completion_mask.sum())
        metrics.update(
            {
                "step": self.step,
                "lr": self.scheduler.get_last_lr()[0],
                "completion/length_mean": n_tok / len(rollout),
                "completion/length_max": float(rollout.lengths.max()),
                "completion/truncated": float(rollout.truncated.float().mean()),
                "time/step": time.perf_counter() - start,
                "tokens_per_s": n_tok / max(stats.times.get("sample", 0.0), 1e-9),
            }
        )
        append_samples(self.run_dir, rollout, self.step, self.cfg.log.samples_per_step)
        return metrics

    def end_iteration(self) -> None:
        """Reference <- policy (the seed's design), then reward hooks."""
        if self.reference is not None and self.cfg.algorithm.reference_refresh == "iteration":
            self.reference.refresh(self.model)
        self.rewards.on_iteration_end(self.step)

    # -- the run -----------------------------------------------------------------------------
    def train(self) -> list[dict[str, float]]:
        t = self.cfg.trainer
        save_config(self.cfg, self.run_dir / "config.yaml")
        history = []
        if self.eval_entries and self.step == 0:
            self._log({"step": 0, **self.evaluate(self.eval_entries)})
        bar = progress(self.cfg.log.progress, t.steps, self.step)
        while self.step < t.steps:
            metrics = self.train_step()
            if (
                self.eval_entries
                and t.eval_every
                and self.step % t.eval_every == 0
                and self.step < t.steps
            ):
                metrics.update(self.evaluate(self.eval_entries))
            if t.save_every and self.step % t.save_every == 0:
                self.save()
            self._log(metrics)
            history.append(metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{metrics.get('reward/mean', float('nan')):.3f}")
        if bar is not None:
            bar.close()
        if self.eval_entries:
            self._log({"step": self.step, **self.evaluate(self.eval_entries)})
        self.save()
        return history

    def evaluate(
        self,
        entries: Sequence[Entry],
        greedy: bool = True,
        samples: int = 1,
        batch_size: int | None = None,
    ) -> dict[str, float]:
        """Mean reward (overall and per reward) on held-out entries, greedy or sampled."""
        limit = self.cfg.data.eval_size or len(entries)
        return evaluate_rewards(
            self.model,
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
        append_metrics(self.run_dir, metrics)

    def state_dict(self) -> dict[str, Any]:
        """The trainer state a checkpoint stores besides weights (grpo_ar/run_state.py)."""
        return trainer_state(self)

    def save(self) -> Path:
        """Policy weights (the whole model, or only the adapter), the reference's and the
        trainer state, atomically, under run_dir/checkpoints/step_N."""
        return save_trainer(self)

    def resume(self, run_dir: str | Path | None = None) -> None:
        """Continue from the newest checkpoint of `run_dir` (default: this run's)."""
        resume_trainer(self, run_dir or self.run_dir)
