"""Parity with TRL 1.16: grpo_ar's core registries give the same loss and gradient as
`GRPOTrainer._compute_loss`, called unbound on a stand-in `self` (trl/trainer/grpo_trainer.py
L3020-3290), and the same group-normalised advantages as `_generate_and_score_completions`."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from grpo_ar.core import AGGREGATIONS, KL, LOSSES, compute_advantages

grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
nanstd = pytest.importorskip("trl.trainer.utils").nanstd
trl_compute_loss = grpo_trainer.GRPOTrainer._compute_loss

N, T, P, MAX_LEN = (
    8,
    12,
    5,
    16,
)  # batch, padded completion width, prompt width, max_completion_length
ATOL = 1e-6

# TRL setup -> (grpo_ar loss, its options, aggregation, normaliser given to it). Normalisers:
# "seqs": total_seqs = sequences in the optimizer step; "local": total_tokens = this micro-batch's
# mask sum (TRL bnpo); "items": total_tokens = num_items_in_batch (global count, TRL dapo/cispo).
# Key: (loss_type, importance_sampling_level, epsilon_low, epsilon_high, extra TRL args as a tuple).
TRL_ARGS = {"sapo": (("sapo_temperature_pos", 1.0), ("sapo_temperature_neg", 1.05))}
VESPO = (
    ("vespo_k_pos", 2.0),
    ("vespo_lambda_pos", 3.0),
    ("vespo_k_neg", 3.0),
    ("vespo_lambda_neg", 2.0),
)
CASES = {
    ("grpo", "token", 0.2, 0.28, ()): ("clip", {}, "seq_mean_token_mean", "seqs"),
    ("bnpo", "token", 0.2, 0.28, ()): ("clip", {}, "token_mean", "local"),
    ("dr_grpo", "token", 0.2, 0.28, ()): ("clip", {}, "seq_mean_token_sum_norm", "seqs"),
    ("dapo", "token", 0.2, 0.28, ()): ("clip", {}, "token_mean", "items"),
    ("cispo", "token", 0.2, 5.0, ()): ("cispo", {}, "token_mean", "items"),
    ("grpo", "sequence", 3e-4, 4e-4, ()): ("gspo", {}, "seq_mean_token_mean", "seqs"),  # GSPO
    # importance_sampling_level="sequence" with the other losses: grpo_ar's ratio_level option
    ("dapo", "sequence", 0.2, 0.28, ()): (
        "clip", {"ratio_level": "sequence"}, "token_mean", "items"),
    ("cispo", "sequence", 0.2, 5.0, ()): (
        "cispo", {"ratio_level": "sequence"}, "token_mean", "items"),
    # two-sided clip (INTELLECT-2): TRL `delta`
    ("dapo", "token", 0.2, 0.28, (("delta", 1.5),)): ("clip", {"delta": 1.5}, "token_mean", "items"),
    ("sapo", "token", 0.2, 0.2, TRL_ARGS["sapo"]): (
        "sapo", {"tau_pos": 1.0, "tau_neg": 1.05}, "seq_mean_token_mean", "seqs"),
    ("sapo", "sequence", 0.2, 0.2, (("sapo_temperature_pos", 0.5), ("sapo_temperature_neg", 2.0))): (
        "sapo", {"tau_pos": 0.5, "tau_neg": 2.0, "ratio_level": "sequence"},
        "seq_mean_token_mean", "seqs"),
    # TRL's luspo sums the whole per-token loss of a sequence (L3179-3187), the β·KL term too:
    # grpo_ar's `luspo` (length-scaled GSPO) matches it at β = 0, and TRL's exact objective for any
    # β is clip on sequence ratios with the seq_mean_token_sum aggregation.
    ("luspo", "sequence", 3e-4, 4e-4, ()): (
        "clip", {"ratio_level": "sequence"}, "seq_mean_token_sum", "seqs"),
    ("vespo", "token", 0.2, 0.2, VESPO): ("vespo", {}, "token_mean", "items"),
    ("vespo", "sequence", 0.2, 0.2, (("vespo_k_pos", 1.0), ("vespo_lambda_pos", 0.5),
                                     ("vespo_k_neg", 4.0), ("vespo_lambda_neg", 1.5))): (
        "vespo", {"k_pos": 1.0, "lambda_pos": 0.5, "k_neg": 4.0, "lambda_neg": 1.5},
        "token_mean", "items"),
}  # fmt: skip


def grpo_ar_options(loss: str, eps_low: float, eps_high: float, extra: dict) -> dict:
    if loss == "cispo":
        return {"max_weight": eps_high, **extra}
    if loss in ("sapo", "vespo"):
        return dict(extra)
    return {"eps_low": eps_low, "eps_high": eps_high, **extra}


class OneProcess:
    """Accelerator on a single process: gather/reduce/pad are the identity."""

    num_processes, process_index, sync_gradients = 1, 0, True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, **kwargs):
        return x


def fake_trainer(loss_type, level, eps_low, eps_high, beta, logp, ga=1, spg=1, extra=()):
    def logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        assert logits_to_keep == logp.shape[1]
        return logp, torch.zeros_like(logp.detach()), None

    return SimpleNamespace(
        loss_type=loss_type,
        beta=beta,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        importance_sampling_level=level,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        max_completion_length=MAX_LEN,
        current_gradient_accumulation_steps=ga,
        args=SimpleNamespace(
            **{"use_bias_correction_kl": False, "delta": None, "steps_per_generation": spg}
            | dict(extra)
        ),
        model=SimpleNamespace(training=True),
        accelerator=OneProcess(),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _get_per_token_logps_and_entropies=logps_and_entropies,
        get_gamma_weights=grpo_trainer.GRPOTrainer.get_gamma_weights,  # a staticmethod
    )


def make_batch(dtype, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -5 * torch.rand(N, T, generator=g, dtype=torch.float64).clamp(min=1e-3)  # in [-5, 0)
    old = logp + noise * torch.randn(N, T, generator=g, dtype=torch.float64)
    ref = logp + noise * torch.randn(N, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[0], lengths[1] = 1, T  # a one-token row and a full row
    mask = (torch.arange(T) < lengths[:, None]).long()  # trailing padding, as TRL pads (L2460-2462)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (logp, old, ref, adv)) + (mask,)


def trl_inputs(old, ref, adv, mask, num_items):
    n = mask.shape[0]
    return {
        "prompt_ids": torch.ones(n, P, dtype=torch.long),
        "prompt_mask": torch.ones(n, P, dtype=torch.long),
        "completion_ids": torch.ones_like(mask),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": num_items,  # L2498: gather(loss_mask.sum()).sum()
    }


def grpo_ar_loss(loss, agg, logp, old, ref, adv, mask, beta, opts, tokens, seqs):
    out = LOSSES[loss](logp, old, adv, mask, **opts)
    tok = out.loss + beta * KL["k3"](logp, ref) if beta else out.loss
    return AGGREGATIONS[agg](tok, mask, tokens, seqs, MAX_LEN), out


def case_id(c):
    return "-".join([c[0], c[1]] + [f"{k}={v}" for k, v in c[4]][:1])


def close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("noise", [1e-3, 0.05, 1.5])  # 1.5: many ratios outside every clip range
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("case", list(CASES), ids=case_id)
def test_loss_and_grad_match_trl(case, beta, noise, dtype):
    loss_type, level, eps_low, eps_high, extra = case
    loss, our_extra, agg, norm = CASES[case]
    logp0, old, ref, adv, mask = make_batch(dtype, noise)
    num_items = mask.sum()

    logp = logp0.clone().requires_grad_(True)
    trainer = fake_trainer(loss_type, level, eps_low, eps_high, beta, logp, extra=extra)
    trl_loss = trl_compute_loss(trainer, None, trl_inputs(old, ref, adv, mask, num_items))
    (trl_grad,) = torch.autograd.grad(trl_loss, logp)

    logp = logp0.clone().requires_grad_(True)
    tokens = mask.sum().item() if norm == "local" else num_items.item()
    opts = grpo_ar_options(loss, eps_low, eps_high, our_extra)
    ours, out = grpo_ar_loss(loss, agg, logp, old, ref, adv, mask, beta, opts, tokens, N)
    (our_grad,) = torch.autograd.grad(ours, logp)

    assert trl_loss.dtype == ours.dtype == dtype
    close(ours, trl_loss)
    close(our_grad, trl_grad)
    assert our_grad.abs().sum() > 0 and our_grad[mask == 0].abs().max() == 0

    # clip statistics: TRL logs masked token means of the same indicators (L3273-3286)
    metrics = trainer._metrics["train"]
    m = mask.to(dtype)
    if level == "token" and loss == "clip":
        assert metrics["clip_ratio/low_mean"][0] == pytest.approx(
            (out.clipped_low * m).sum() / m.sum()
        )
        assert metrics["clip_ratio/high_mean"][0] == pytest.approx(
            (out.clipped_high * m).sum() / m.sum()
        )
    if loss == "cispo":
        assert metrics["cispo_clip_ratio"][0] == pytest.approx(
            (out.clipped_high * m).sum() / m.sum()
        )
    # the clipping branch is really exercised (a sequence mean of ratios stays inside CISPO's [0, 5])
    if noise == 1.5 and loss not in ("sapo", "vespo") and (loss, level) != ("cispo", "sequence"):
        assert ((out.clipped_low + out.clipped_high) * m).sum() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize(
    "case",
    # bnpo is left out: TRL normalises each micro-batch by its own token count (L3158-3163) and then
    # divides by the accumulation steps, a local normaliser that no global count reproduces when
    # micro-batches hold different numbers of tokens; grpo_ar's token_mean is global by design.
    [c for c in CASES if c[0] != "bnpo"],
    ids=case_id,
)
def test_gradient_accumulation_matches_trl(case, beta, dtype):
    """Two micro-batches of one generation batch (gradient_accumulation_steps =
    steps_per_generation = 2): the sum of TRL's micro-batch losses equals grpo_ar's aggregation of
    each micro-batch with the global counts, summed."""
    loss_type, level, eps_low, eps_high, extra = case
    loss, our_extra, agg, _ = CASES[case]
    logp0, old, ref, adv, mask = make_batch(dtype, 1.5, seed=1)
    mask[: N // 2, T // 2 :] = 0  # the two micro-batches hold different token counts
    num_items = mask.sum()
    halves = [slice(0, N // 2), slice(N // 2, N)]
    opts = grpo_ar_options(loss, eps_low, eps_high, our_extra)

    logp = logp0.clone().requires_grad_(True)
    trl_total = 0
    for s in halves:
        trainer = fake_trainer(
            loss_type, level, eps_low, eps_high, beta, logp[s], ga=2, spg=2, extra=extra
        )
        inputs = trl_inputs(old[s], ref[s], adv[s], mask[s], num_items)
        trl_total = trl_total + trl_compute_loss(trainer, None, inputs)
    (trl_grad,) = torch.autograd.grad(trl_total, logp)

    logp = logp0.clone().requires_grad_(True)
    ours = sum(
        grpo_ar_loss(
            loss, agg, logp[s], old[s], ref[s], adv[s], mask[s], beta, opts, num_items.item(), N
        )[0]
        for s in halves
    )
    (our_grad,) = torch.autograd.grad(ours, logp)

    close(ours, trl_total)
    close(our_grad, trl_grad)


def trl_group_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """TRL 1.16 grpo_trainer.py L2761-2810 with one reward function of weight 1,
    multi_objective_aggregation="sum_then_normalize", scale_rewards="group" (the defaults).
    Re-typed because `_generate_and_score_completions` needs a model and generation; `nanstd`
    is TRL's own (trl/trainer/utils.py L1021, Bessel-corrected)."""
    rewards_per_func = rewards[:, None]
    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * torch.ones(1, dtype=rewards.dtype)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
    std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    advantages = (rewards - mean_grouped_rewards) / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("group_size", [2, 4, 8])
@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("unscorable", [False, True])
def test_group_advantages_match_trl(group_size, binary, unscorable, dtype):
    g = torch.Generator().manual_seed(group_size)
    rewards = torch.randn(32, generator=g, dtype=torch.float64)
    if binary:
        rewards = (rewards > 0).to(torch.float64)
    groups = rewards.view(-1, group_size)
    groups[:, 0], groups[:, 1] = 0.0, 1.0  # no zero-variance group
    if unscorable:  # TRL: every reward function returned None. For G = 2 this leaves one scorable
        # member: TRL's nanstd is NaN there, then nan_to_num gives 0; grpo_ar gives 0 directly.
        rewards[group_size - 1 :: group_size] = torch.nan
    rewards = rewards.to(dtype)

    expected = trl_group_advantages(rewards.clone(), group_size)
    adv, valid = compute_advantages("grpo", rewards, group_size, eps=1e-4)
    close(adv, expected)
    assert valid.tolist() == (~torch.isnan(rewards)).tolist()
