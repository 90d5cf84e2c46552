"""Parity of grpo_ar.core.corrections with TRL 1.16 (trl/trainer/grpo_trainer.py): TRL's own
`get_off_policy_mask` / `get_high_entropy_mask` and `_compute_loss` (called unbound on a stand-in
`self`, as tests/core/test_trl_parity.py does) with the sampler IS ratio, off-policy mask,
high-entropy mask, bias-corrected KL, entropy bonus and adaptive entropy control switched on."""

import math
import types
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from grpo_ar.core.aggregation import AGGREGATIONS
from grpo_ar.core.corrections import (
    IS_CORRECTIONS,
    AdaptiveEntropyCoef,
    entropy_bonus,
    entropy_threshold,
    high_entropy_mask,
    off_policy_sequence_mask,
)
from grpo_ar.core.losses import LOSSES
from grpo_ar.core.objective import token_objective

grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
Trainer = grpo_trainer.GRPOTrainer
N, T, P, MAX_LEN = 8, 12, 5, 16
ATOL = 1e-6


def close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


class Accelerator:
    """`world` processes seen from rank 0: `others` are the other ranks' local tensors."""

    num_processes, process_index = 1, 0

    def __init__(self, others=()):
        self.others, self.sync_gradients = list(others), True

    def pad_across_processes(self, x, dim=0, pad_index=0, pad_first=False):
        width = max([x.shape[0]] + [o.shape[0] for o in self.others])
        return torch.cat([x, x.new_full((width - x.shape[0],), pad_index)])

    def gather(self, x):
        if not self.others:
            return x
        return torch.cat([x] + [self.pad_across_processes(o, pad_index=-1e9) for o in self.others])

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x


def make_batch(dtype=torch.float64, noise=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -5 * torch.rand(N, T, generator=g, dtype=torch.float64).clamp(min=1e-3)
    old = logp + noise * torch.randn(N, T, generator=g, dtype=torch.float64)
    ref = logp + noise * torch.randn(N, T, generator=g, dtype=torch.float64)
    sampling = old + noise * torch.randn(N, T, generator=g, dtype=torch.float64)
    ent = 4 * torch.rand(N, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[0], lengths[1] = 1, T
    mask = (torch.arange(T) < lengths[:, None]).long()  # TRL pads on the right (L2460-2462)
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    cast = (t.to(dtype) for t in (logp, old, ref, sampling, ent, adv))
    return (*cast, mask)


# ---------------------------------------------------------------- sampler IS correction


def trl_is_ratio(old_per_token_logps, sampling_per_token_logps, mask, mode, clip_min, clip_max):
    """TRL 1.16 grpo_trainer.py L2660-2707, re-typed: it sits inside
    `_generate_and_score_completions`, which needs vLLM and a generation."""
    per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    sequence_level_is = mode in ["sequence_mask", "sequence_truncate"]
    if sequence_level_is:
        logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    else:
        logps_diff = per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        min_val = clip_min if clip_min is not None else -math.inf
        max_val = clip_max if clip_max is not None else math.inf
        ratio = ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)
    return ratio


BOUNDS = [(None, 3.0), (0.5, 2.0), (0.8, None), (None, None)]
IS_CASES = [
    (name, b) for name in sorted(IS_CORRECTIONS) for b in BOUNDS
    if not (b == (None, None) and name.endswith("truncate"))  # refused by grpo_config.py L1163-1171
]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("noise", [0.05, 0.5, 20.0])  # 20: ratios overflow exp in the sequence sum
@pytest.mark.parametrize("case", IS_CASES, ids=str)
def test_is_correction_matches_trl(case, noise, dtype):
    name, (c_min, c_max) = case
    _, old, _, sampling, _, _, mask = make_batch(dtype, noise)
    sampling[2, 0] = sampling[3, 1] = math.nan  # tokens the sampler could not score
    sampling = torch.where(mask.bool(), sampling, torch.full_like(sampling, math.inf))  # padding
    expected = trl_is_ratio(old, sampling, mask, name, c_min, c_max)
    got = IS_CORRECTIONS[name](old, sampling, mask, c_min=c_min, c_max=c_max)
    assert got.shape == expected.shape and got.dtype == dtype
    if c_max is None and noise == 20.0:  # unbounded ratios: compare in log space
        close(got.log().nan_to_num(neginf=-1e4), expected.log().nan_to_num(neginf=-1e4))
    else:
        close(got, expected)


# ---------------------------------------------------------------- the stand-in TRL trainer


def fake_trainer(loss_type="dapo", level="token", beta=0.0, ga=1, spg=1, others=(), **opts):
    """A stand-in `self` for `GRPOTrainer._compute_loss`; `ns.current = (logp, entropies)` is what
    the model "returns" on the next call."""
    ns = SimpleNamespace(
        loss_type=loss_type,
        beta=beta,
        epsilon_low=0.2,
        epsilon_high=0.28,
        importance_sampling_level=level,
        top_entropy_quantile=opts.get("top_entropy_quantile", 1.0),
        off_policy_mask_threshold=opts.get("off_policy_mask_threshold"),
        use_vllm=opts.get("use_vllm", False),
        vllm_importance_sampling_correction=opts.get("use_vllm", False),
        aux_loss_enabled=False,
        entropy_coef=opts.get("entropy_coef", 0.0),
        use_adaptive_entropy=opts.get("use_adaptive_entropy", False),
        _last_world_entropy=float("inf"),  # L853
        _entropy_window_stats=None,
        max_completion_length=MAX_LEN,
        current_gradient_accumulation_steps=ga,
        args=SimpleNamespace(
            use_bias_correction_kl=opts.get("use_bias_correction_kl", False),
            delta=None,
            steps_per_generation=spg,
            entropy_target=opts.get("entropy_target", 0.2),
            entropy_coef_delta=opts.get("entropy_coef_delta", 0.005),
            entropy_coef_min=opts.get("entropy_coef_min", 0.0),
            entropy_coef_max=opts.get("entropy_coef_max", 1.0),
        ),
        model=SimpleNamespace(training=True),
        accelerator=Accelerator(others),
        _metrics=defaultdict(lambda: defaultdict(list)),
        get_off_policy_mask=Trainer.get_off_policy_mask,  # staticmethods
        get_gamma_weights=Trainer.get_gamma_weights,
    )
    ns._entropy_bonus_enabled = ns.entropy_coef != 0.0 or ns.use_adaptive_entropy  # L850
    ns.get_high_entropy_mask = types.MethodType(Trainer.get_high_entropy_mask, ns)

    def logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        logp, ent = ns.current
        assert logits_to_keep == logp.shape[1]
        return logp, ent, None

    ns._get_per_token_logps_and_entropies = logps_and_entropies
    return ns


def trl_loss(trainer, logp, ent, old, ref, adv, mask, num_items, **extra):
    trainer.current = (logp, ent)
    inputs = {
        "prompt_ids": torch.ones(mask.shape[0], P, dtype=torch.long),
        "prompt_mask": torch.ones(mask.shape[0], P, dtype=torch.long),
        "completion_ids": torch.ones_like(mask),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": num_items,
        **extra,
    }
    return Trainer._compute_loss(trainer, None, inputs)


# ---------------------------------------------------------------- off-policy sequence mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.5])
@pytest.mark.parametrize("adv_shape", ["N", "N1", "NT"])
def test_off_policy_mask_matches_trl(threshold, dtype, adv_shape):
    logp, _, _, sampling, _, adv, mask = make_batch(dtype, noise=0.4, seed=1)
    sampling[4, 0] = math.nan
    a = {"N": adv, "N1": adv[:, None], "NT": adv[:, None] + 0.3 * torch.randn(N, T, dtype=dtype)}
    trl_adv = a[adv_shape] if adv_shape != "N" else adv[:, None]  # TRL unsqueezes (L3058-3059)
    expected = Trainer.get_off_policy_mask(trl_adv, logp, sampling, mask, threshold)
    got = off_policy_sequence_mask(a[adv_shape], logp, sampling, mask, threshold=threshold)
    assert got.shape == expected.shape and torch.equal(got, expected.bool())
    if adv_shape != "NT":
        assert not got.all() or threshold == 0.5


# ---------------------------------------------------------------- 80/20 high-entropy mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rho", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("ties", [False, True])
def test_high_entropy_mask_matches_trl(rho, dtype, ties):
    *_, ent, _, mask = make_batch(dtype, seed=2)
    if ties:
        ent = (ent * 2).round() / 2
    stand_in = SimpleNamespace(accelerator=Accelerator())
    expected = Trainer.get_high_entropy_mask(stand_in, ent, mask, 1 - rho)  # as called at L3050
    assert torch.equal(high_entropy_mask(ent, mask, rho), expected)
    none = torch.zeros_like(mask)
    assert torch.equal(
        high_entropy_mask(ent, none, rho),
        Trainer.get_high_entropy_mask(stand_in, ent, none, 1 - rho),
    )


def test_high_entropy_threshold_is_trls_across_processes():
    """TRL gathers every rank's valid entropies of the current micro-batch (L1397-1413); the same
    threshold is `entropy_threshold` over the union. It still depends on the micro-batch split."""
    *_, ent, _, mask = make_batch(torch.float32, seed=3)
    rank1_ent, rank1_mask = ent.flip(0) * 1.5, mask.flip(1)
    stand_in = SimpleNamespace(accelerator=Accelerator([rank1_ent[rank1_mask.bool()]]))
    expected = Trainer.get_high_entropy_mask(stand_in, ent, mask, 0.8)
    thr = entropy_threshold(torch.cat([ent, rank1_ent]), torch.cat([mask, rank1_mask]), 0.2)
    assert torch.equal(high_entropy_mask(ent, mask, threshold=thr), expected)
    assert not torch.equal(high_entropy_mask(ent, mask, 0.2), expected)  # rank-local differs


# ---------------------------------------------------------------- everything through _compute_loss


def grpo_ar_terms(logp, ent, old, ref, sampling, adv, mask, opts, level, beta):
    """grpo_ar's own composition, `core.objective.token_objective` (TRL's order, L3140-3150)."""
    vllm = opts.get("use_vllm", False)
    terms = token_objective(
        logp, old, adv, mask,
        loss="clip", loss_args={"eps_low": 0.2, "eps_high": 0.28, "ratio_level": level},
        ref_logp=ref, beta=beta, kl="k3",
        kl_bias_correction=opts.get("use_bias_correction_kl", False),
        sampling_logp=sampling if vllm else None,
        is_correction=opts["is_mode"] if vllm else None,
        is_correction_args={"c_min": 0.5, "c_max": 3.0},
        off_policy_mask_threshold=opts.get("off_policy_mask_threshold"),
        entropy=ent, top_entropy_quantile=opts.get("top_entropy_quantile", 1.0),
    )  # fmt: skip
    return terms.loss, terms.entropy_keep.bool(), terms.keep.bool(), terms.is_weight


COMBOS = {
    "bias_kl": {"use_bias_correction_kl": True},
    "off_policy": {"off_policy_mask_threshold": 0.01},
    "entropy_mask": {"top_entropy_quantile": 0.2},
    "is_token_truncate": {"use_vllm": True, "is_mode": "token_truncate"},
    "is_sequence_mask": {"use_vllm": True, "is_mode": "sequence_mask"},
    "all": {"use_bias_correction_kl": True, "off_policy_mask_threshold": 0.1,
            "top_entropy_quantile": 0.2, "use_vllm": True, "is_mode": "token_mask",
            "entropy_coef": 0.03},
    "entropy_bonus": {"entropy_coef": 0.05},
}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("combo", list(COMBOS))
def test_compute_loss_matches_trl(combo, level, dtype):
    opts = COMBOS[combo]
    beta = 0.04
    logp0, old, ref, sampling, ent0, adv, mask = make_batch(dtype, noise=0.3, seed=4)
    num_items = mask.sum()
    extra = {"sampling_per_token_logps": sampling} if opts.get("use_vllm") else {}
    if opts.get("use_vllm"):
        trl_mode = {"is_mode": opts["is_mode"]}
        extra["importance_sampling_ratio"] = trl_is_ratio(
            old, sampling, mask, trl_mode["is_mode"], 0.5, 3.0
        )
    trl_opts = {k: v for k, v in opts.items() if k != "is_mode"}

    logp, ent = logp0.clone().requires_grad_(True), ent0.clone().requires_grad_(True)
    trainer = fake_trainer("dapo", level, beta, **trl_opts)
    expected = trl_loss(trainer, logp, ent, old, ref, adv, mask, num_items, **extra)
    trl_grads = torch.autograd.grad(expected, (logp, ent), allow_unused=True)

    logp, ent = logp0.clone().requires_grad_(True), ent0.clone().requires_grad_(True)
    tok, emask, keep, w = grpo_ar_terms(logp, ent, old, ref, sampling, adv, mask, opts, level, beta)
    # every switched-on option really acts on this batch
    if "off_policy_mask_threshold" in opts or "top_entropy_quantile" in opts:
        assert keep.sum() < mask.sum()
    if w is not None:
        assert (w[mask.bool().expand_as(w) if w.shape[1] > 1 else slice(None)] != 1).any()
    ours = AGGREGATIONS["token_mean"](tok, mask, num_items.item(), N, MAX_LEN)
    if opts.get("entropy_coef"):
        bonus_mask = mask.bool() & emask
        ours = ours - opts["entropy_coef"] * entropy_bonus(ent, bonus_mask, int(bonus_mask.sum()))
    grads = torch.autograd.grad(ours, (logp, ent), allow_unused=True)

    close(ours, expected)
    close(grads[0], trl_grads[0])
    if opts.get("entropy_coef"):
        close(grads[1], trl_grads[1])
        assert grads[1].abs().sum() > 0
    else:
        assert trl_grads[1] is None or trl_grads[1].abs().sum() == 0


# ---------------------------------------------------------------- entropy bonus and its control


def test_entropy_bonus_accumulation_relation_to_trl():
    """TRL's bonus is each micro-batch's own mean / accumulation steps (L3198-3201):
    entropy_bonus with total_tokens = local count · steps reproduces it; with the global count the
    micro-batch parts sum to the full-batch mean instead (they agree when counts are equal)."""
    logp0, old, ref, _, ent0, adv, mask = make_batch(seed=5)
    mask[: N // 2, T // 2 :] = 0  # unequal token counts
    num_items, coef = mask.sum(), 0.1
    halves = (slice(0, N // 2), slice(N // 2, N))
    trl_total, ours_local, ours_global = 0, 0, 0
    for s in halves:
        trainer = fake_trainer("dapo", ga=2, spg=2, entropy_coef=coef)
        with_bonus = trl_loss(trainer, logp0[s], ent0[s], old[s], None, adv[s], mask[s], num_items)
        trainer = fake_trainer("dapo", ga=2, spg=2)
        without = trl_loss(trainer, logp0[s], ent0[s], old[s], None, adv[s], mask[s], num_items)
        trl_bonus = (without - with_bonus) / coef
        local = entropy_bonus(ent0[s], mask[s], int(mask[s].sum()) * 2)
        close(local, trl_bonus)
        trl_total, ours_local = trl_total + trl_bonus, ours_local + local
        ours_global = ours_global + entropy_bonus(ent0[s], mask[s], int(num_items))
    close(ours_local, trl_total)
    close(ours_global, ent0[mask.bool()].mean())
    assert abs(float(ours_global - trl_total)) > 1e-3  # the two normalisations differ here


def trl_adaptive_update(entropy_coef, window_stats, args):
    """TRL 1.16 grpo_trainer.py L3229-3239, re-typed (one optimizer-step boundary)."""
    world_entropy = (window_stats[0] / window_stats[1].clamp(min=1.0)).item()
    if world_entropy <= args.entropy_target:
        entropy_coef = min(entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
    else:
        entropy_coef = max(entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
    return entropy_coef, world_entropy


ADAPTIVE = {
    "entropy_coef": 0.02,
    "entropy_target": 1.0,
    "entropy_coef_delta": 0.015,
    "entropy_coef_min": 0.005,
    "entropy_coef_max": 0.05,
}


def controller():
    a = ADAPTIVE
    return AdaptiveEntropyCoef(
        a["entropy_coef"], target=a["entropy_target"], delta=a["entropy_coef_delta"],
        coef_min=a["entropy_coef_min"], coef_max=a["entropy_coef_max"],
    )  # fmt: skip


def test_adaptive_entropy_matches_trl_compute_loss():
    """TRL's own `_compute_loss` over 8 optimizer steps of 2 micro-batches each: the loss of every
    micro-batch (hence the coefficient applied) and the controller state after every step."""
    logp0, old, _, _, ent0, adv, mask = make_batch(seed=6)
    mask[: N // 2, T // 3 :] = 0
    num_items = mask.sum()
    trainer = fake_trainer("dapo", ga=2, spg=2, use_adaptive_entropy=True, **ADAPTIVE)
    ctl = controller()
    levels = [1.5, 0.6, 0.4, 0.3, 0.2, 0.9, 1.8, 0.3]  # mean entropy scale per optimizer step
    applied = []
    for level in levels:
        for k, s in enumerate((slice(0, N // 2), slice(N // 2, N))):
            ent = ent0[s] * level / 2
            trainer.accelerator.sync_gradients = k == 1
            expected = trl_loss(trainer, logp0[s], ent, old[s], None, adv[s], mask[s], num_items)
            policy = LOSSES["clip"](logp0[s], old[s], adv[s], mask[s], eps_low=0.2, eps_high=0.28)
            ours = AGGREGATIONS["token_mean"](policy.loss, mask[s], num_items.item(), N, MAX_LEN)
            ours = ours - ctl.coef * entropy_bonus(ent, mask[s], int(mask[s].sum()) * 2)
            close(ours, expected)
            applied.append(ctl.coef)
            ctl.observe(torch.where(mask[s].bool(), ent, 0).sum(), mask[s].sum())
        ctl.step()
        assert ctl.value == pytest.approx(trainer.entropy_coef, abs=1e-12)
        assert ctl.last_entropy == pytest.approx(trainer._last_world_entropy, abs=ATOL)
        assert trainer._metrics["train"]["entropy_coef"][-1] == pytest.approx(ctl.value, abs=1e-12)
    assert 0.0 in applied and max(applied) == pytest.approx(0.05)  # gated off, then capped
    saved = ctl.state_dict()
    assert saved["entropy_coef"] == pytest.approx(trainer.entropy_coef)
    assert saved["last_world_entropy"] == pytest.approx(trainer._last_world_entropy)


def test_adaptive_entropy_long_sequence_matches_trl_update():
    g = torch.Generator().manual_seed(7)
    args = SimpleNamespace(**ADAPTIVE)
    ctl, coef = controller(), ADAPTIVE["entropy_coef"]
    last = math.inf
    for _ in range(300):
        stats = []
        for _ in range(3):  # micro-batches
            count = int(torch.randint(1, 50, (1,), generator=g))
            stats.append([float(torch.rand(1, generator=g)) * 2.1 * count, count])
            ctl.observe(*stats[-1])
        trl_apply = coef if last <= args.entropy_target else 0.0  # L3206-3207
        assert ctl.coef == trl_apply
        window = torch.tensor(stats, dtype=torch.float64).sum(0)
        coef, last = trl_adaptive_update(coef, window, args)
        assert ctl.step() == pytest.approx(last, abs=1e-12)
        assert ctl.value == pytest.approx(coef, abs=1e-12)
