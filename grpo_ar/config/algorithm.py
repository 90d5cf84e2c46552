"""The `[algorithm]` section: every objective option, validated against the core registries.

Each option maps to one registry entry or one pure function in `grpo_ar.core`; docs/algorithms.md
lists them with their papers and TRL / verl names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core import ADVANTAGES, AGGREGATIONS, KL, LOSSES, Registry
from ..errors import ConfigError, need
from ..train.reference import REFERENCE_REFRESH


@dataclass(frozen=True)
class AlgorithmConfig:
    """The GRPO objective: group size, advantage estimator, policy loss, KL, aggregation."""

    group_size: int = 8
    """GS: completions sampled per prompt."""
    grpo_iters: int = 1
    """μ: optimizer passes over each generated batch."""
    advantage: str = "grpo"
    """Advantage estimator (core.ADVANTAGES)."""
    advantage_args: dict[str, Any] = field(default_factory=dict)
    """Options of the estimator, e.g. {eps = 1e-4, scale = "batch"}."""
    multi_objective: str = "sum_then_normalize"
    """Several rewards: sum_then_normalize (weighted sum, then the estimator) or
    normalize_then_sum (GDPO arXiv 2601.05242: each reward normalised in its group first)."""
    loss: str = "clip"
    """Policy loss (core.LOSSES)."""
    loss_args: dict[str, Any] = field(default_factory=dict)
    """Options of the loss, e.g. {eps_low = 0.2, eps_high = 0.28, ratio_level = "sequence"}."""
    aggregation: str = "token_mean"
    """Token -> scalar reduction (core.AGGREGATIONS); token_mean is DAPO's and TRL's default."""
    beta: float = 0.04
    """KL coefficient; 0 builds no reference model."""
    kl: str = "k3"
    """KL estimator (core.KL)."""
    kl_args: dict[str, Any] = field(default_factory=dict)
    """Options of the KL estimator, e.g. {clamp = 20.0}."""
    kl_bias_correction: bool = False
    """Multiply the per-token KL by the ratio π/π_old (DeepSeek-V3.2; TRL use_bias_correction_kl)."""
    reference_refresh: str = "iteration"
    """iteration: reference <- policy after each iteration (the seed's design); never; soft:
    TR-DPO's π_ref <- α·π + (1-α)·π_ref every reference_sync_every optimizer steps."""
    reference_mix_alpha: float = 0.6
    """TR-DPO α (TRL ref_model_mixup_alpha), for reference_refresh = soft."""
    reference_sync_every: int = 512
    """TR-DPO τ in optimizer steps (TRL ref_model_sync_steps), for reference_refresh = soft."""
    is_correction: str | None = None
    """Sampler importance-sampling correction (core.IS_CORRECTIONS: token_truncate, token_mask,
    sequence_truncate, sequence_mask) from the recorded sampling log-probs; None = off."""
    is_correction_args: dict[str, Any] = field(default_factory=dict)
    """Options of the correction, e.g. {c_max = 2.0}."""
    off_policy_mask_threshold: float | None = None
    """DeepSeek-V3.2 eq. 9: drop negative-advantage sequences whose mean KL(sampler || policy)
    exceeds δ (TRL off_policy_mask_threshold); None = off."""
    mask_truncated_completions: bool = False
    """Leave completions cut at max_new_tokens out of the loss (DAPO; TRL option of this name)."""
    top_entropy_quantile: float = 1.0
    """ρ: keep only the top-ρ fraction of tokens by entropy in the policy term (arXiv 2506.01939)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient: loss - coef·mean entropy (the initial value when adaptive)."""
    entropy_target: float | None = None
    """Set to make the coefficient adaptive (Skywork-OR1 arXiv 2505.22312): applied only while
    the entropy is <= target, raised by entropy_coef_delta below it, lowered above it."""
    entropy_coef_delta: float = 0.005
    """Step of the adaptive entropy coefficient."""
    entropy_coef_min: float = 0.0
    """Lower bound of the adaptive entropy coefficient."""
    entropy_coef_max: float = 1.0
    """Upper bound of the adaptive entropy coefficient."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose rewards are all equal and sample more prompts
    until the batch is full (at most dynamic_sampling_max_rounds rounds)."""
    dynamic_sampling_max_rounds: int = 4
    """Sampling rounds per step under dynamic sampling; the step trains on what it has then."""

    def __post_init__(self) -> None:
        need(
            self.group_size >= 2,
            f"algorithm.group_size={self.group_size}: need >= 2 "
            "(a group of one has no baseline, every advantage would be 0)",
        )
        need(self.grpo_iters >= 1, f"algorithm.grpo_iters={self.grpo_iters}: need >= 1")
        need(self.beta >= 0, f"algorithm.beta={self.beta}: need >= 0")
        need(
            self.reference_refresh in REFERENCE_REFRESH,
            f"algorithm.reference_refresh={self.reference_refresh!r}: use "
            + ", ".join(sorted(REFERENCE_REFRESH)),
        )
        need(
            0 < self.reference_mix_alpha <= 1 and self.reference_sync_every >= 1,
            "algorithm.reference_mix_alpha must be in (0, 1] and reference_sync_every >= 1",
        )
        self._check_registries()
        self._check_regularisers()
        self._dry_run()

    def _check_registries(self) -> None:
        from ..core.advantages import MULTI_OBJECTIVE
        from ..core.corrections import IS_CORRECTIONS

        checks: list[tuple[Registry, str, Mapping[str, Any], str]] = [
            (ADVANTAGES, self.advantage, self.advantage_args, "advantage"),
            (LOSSES, self.loss, self.loss_args, "loss"),
            (KL, self.kl, self.kl_args, "kl"),
            (AGGREGATIONS, self.aggregation, {}, "aggregation"),
        ]
        if self.is_correction is not None:
            checks.append(
                (IS_CORRECTIONS, self.is_correction, self.is_correction_args, "is_correction")
            )
        else:
            need(
                not self.is_correction_args,
                "algorithm.is_correction_args given without is_correction",
            )
        for reg, name, args, key in checks:
            if name not in reg:
                raise ConfigError(
                    f"algorithm.{key}={name!r} is unknown; valid: {', '.join(sorted(reg))}"
                )
            try:
                reg.check_options(name, args, f"algorithm.{key}_args")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        need(
            self.multi_objective in MULTI_OBJECTIVE,
            f"algorithm.multi_objective={self.multi_objective!r}: use "
            + " or ".join(MULTI_OBJECTIVE),
        )

    def _check_regularisers(self) -> None:
        need(
            0 < self.top_entropy_quantile <= 1,
            f"algorithm.top_entropy_quantile={self.top_entropy_quantile}: need 0 < ρ <= 1",
        )
        need(self.entropy_coef >= 0, "algorithm.entropy_coef must be >= 0")
        if self.entropy_target is not None:
            need(
                0 <= self.entropy_coef_min <= self.entropy_coef_max and self.entropy_coef_delta > 0,
                "adaptive entropy needs 0 <= entropy_coef_min <= entropy_coef_max and "
                "entropy_coef_delta > 0",
            )
        need(
            not (self.kl_bias_correction and self.beta == 0),
            "algorithm.kl_bias_correction corrects the KL term, which beta = 0 switches off: "
            "set beta > 0 or drop kl_bias_correction",
        )
        t = self.off_policy_mask_threshold
        need(t is None or t >= 0, f"algorithm.off_policy_mask_threshold={t}: need >= 0")
        need(
            self.dynamic_sampling_max_rounds >= 1,
            "algorithm.dynamic_sampling_max_rounds must be >= 1",
        )

    def _dry_run(self) -> None:
        """Call the chosen loss and estimator once on a tiny batch, so a combination they refuse
        (e.g. luspo with token ratios) fails here, not mid-run."""
        g = self.group_size
        logp = torch.full((g, 2), -1.0)
        mask = torch.ones(g, 2)
        adv = torch.linspace(-1, 1, g)
        try:
            LOSSES[self.loss](logp, logp, adv, mask, **self.loss_args)
        except ValueError as e:
            raise ConfigError(f"algorithm.loss={self.loss!r} with {self.loss_args}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"algorithm.loss_args: {e}") from None
        from ..core.advantages import check_advantages

        try:
            check_advantages(self.advantage, g, self.multi_objective, **self.advantage_args)
        except ValueError as e:
            raise ConfigError(f"algorithm.advantage={self.advantage!r}: {e}") from None
