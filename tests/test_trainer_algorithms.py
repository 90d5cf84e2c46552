"""Every algorithm option runs through the unchanged trainer: one registry lookup each, no
trainer branch. Numbers are checked in tests/core; here: wiring, finiteness, and the effects a
trainer-level option must have (masks reach the loss, ReMax samples a greedy baseline, ...)."""

import math

import pytest
import torch
from test_trainer import make, params

from grpo_ar.core import ADVANTAGES, LOSSES
from grpo_ar.core.corrections import IS_CORRECTIONS
from grpo_ar.rewards import REWARDS, per_sample, register_reward

if "toy_twos" not in REWARDS:

    @register_reward("toy_twos")
    @per_sample
    def toy_twos(output: str) -> float:
        return output.count("2") / 8


def run_step(tmp_path, overrides, reward="toy_sevens"):
    tr = make(tmp_path, ["trainer.steps=1", "trainer.batch_size=2", *overrides], reward=reward)
    before = params(tr)
    metrics = tr.train_step()
    after = params(tr)
    moved = any(not torch.equal(before[k], after[k]) for k in before)
    return tr, metrics, moved


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_trains(tmp_path, loss):
    extra = ["algorithm.grpo_iters=2"]
    tr, m, moved = run_step(tmp_path, [f"algorithm.loss={loss}", *extra])
    assert math.isfinite(m["loss"]) and moved and m.get("skipped_updates", 0) == 0


@pytest.mark.parametrize("adv", sorted(ADVANTAGES))
def test_every_advantage_estimator_trains(tmp_path, adv):
    tr, m, _ = run_step(tmp_path, [f"algorithm.advantage={adv}"])
    assert math.isfinite(m["loss"])
    assert torch.isfinite(tr.last_rollout.data["adv"]).all()


def test_remax_samples_one_greedy_baseline_per_prompt(tmp_path, monkeypatch):
    tr = make(tmp_path, ["trainer.steps=1", "trainer.batch_size=2", "algorithm.advantage=remax"])
    calls = []
    real = tr.adapter.sample

    def spy(model, prompts, g, generator=None, greedy=False):
        calls.append((g, greedy, len(prompts)))
        return real(model, prompts, g, generator=generator, greedy=greedy)

    monkeypatch.setattr(tr.adapter, "sample", spy)
    m = tr.train_step()
    assert sorted(calls) == [(1, True, 2), (4, False, 2)]
    assert "reward/greedy_baseline" in m
    r = tr.last_rollout.extras["reward"].total
    base = m["reward/greedy_baseline"]
    assert base == pytest.approx(float(r.mean() - tr.last_rollout.data["adv"].mean()), abs=1e-6)


def test_gdpo_normalises_each_reward(tmp_path):
    reward = [{"name": "toy_sevens"}, {"name": "toy_twos", "weight": 2.0}]
    tr, m, _ = run_step(tmp_path, ["algorithm.multi_objective=normalize_then_sum"], reward=reward)
    comps = tr.last_rollout.extras["reward"].components
    assert comps.shape[1] == 2 and math.isfinite(m["loss"])


def test_mask_truncated_completions_removes_them_from_the_loss(tmp_path):
    # max_new_tokens = 8 and the tiny random model rarely emits EOS: most rows are truncated
    tr, m, moved = run_step(tmp_path, ["algorithm.mask_truncated_completions=true"])
    ro = tr.last_rollout
    assert ro.truncated.any()
    lm = tr._loss_mask(ro)
    assert lm[ro.truncated].sum() == 0
    if ro.truncated.all():  # nothing to learn from: zero loss, zero gradient
        assert not moved and m["loss"] == 0


@pytest.mark.parametrize("mode", sorted(IS_CORRECTIONS))
def test_sampler_is_correction_runs_for_every_mode(tmp_path, mode):
    # train_filters=false: the sampler renormalises over the top-p set, the trainer scores the
    # full distribution, so π_old/π_sampler <= 1 on every token and the mean weight drops below 1
    # (toy_len: completion lengths differ within a group, so the advantages are never all 0)
    tr, m, moved = run_step(
        tmp_path,
        [f"algorithm.is_correction={mode}", "sampling.top_p=0.8", "sampling.train_filters=false"],
        reward="toy_len",
    )
    assert moved and 0 < m["is_weight"] < 1


def test_regularisers_and_masks_together(tmp_path):
    tr, m, moved = run_step(
        tmp_path,
        [
            "algorithm.top_entropy_quantile=0.5",
            "algorithm.off_policy_mask_threshold=0.0",
            "algorithm.kl_bias_correction=true",
            "algorithm.entropy_coef=0.01",
            "algorithm.entropy_target=100.0",
            "algorithm.grpo_iters=2",
        ],
    )
    assert moved and math.isfinite(m["loss"])
    assert 0.3 < m["tokens/kept"] <= 0.75  # the entropy mask keeps about half the tokens
    # raised by δ after each of the 2 optimizer steps (entropy <= target): mean of 0.015, 0.02
    assert m["entropy_coef"] == pytest.approx(0.0175)


# -- DAPO dynamic sampling -------------------------------------------------------------------------
if "toy_first_digit" not in REWARDS:

    @register_reward("toy_first_digit")
    def toy_first_digit(outputs, args, ctx):
        """Groups of even prompts all score 0 (no signal); odd prompts score by '7' count."""
        return [
            0.0 if int(e.prompt.split("+")[0]) % 2 == 0 else o.count("7") / 8
            for o, e in zip(outputs, ctx.entries)
        ]


def test_concat_rollouts_scores_like_its_parts(tmp_path):
    from grpo_ar.train.batching import concat_rollouts

    tr = make(tmp_path, ["trainer.batch_size=2"])
    parts = []
    for entries in (tr.train_entries[:2], tr.train_entries[5:8]):
        prompts = tr.adapter.encode(entries)
        parts.append(tr.adapter.sample(tr.model, prompts, 4, generator=tr.generator))
    joined = concat_rollouts(parts, pad_id=0)
    assert len(joined) == 20 and joined.group_ids.tolist() == [i // 4 for i in range(20)]
    assert [e.prompt for e in joined.entries] == [e.prompt for p in parts for e in p.entries]
    with torch.no_grad():
        whole = tr.adapter.token_logprobs(tr.model, joined)[0]
        split = [tr.adapter.token_logprobs(tr.model, p)[0] for p in parts]
    for (lo, hi), part in zip(((0, 8), (8, 20)), split):
        w = part.shape[1]
        torch.testing.assert_close(whole[lo:hi, :w], part, atol=1e-5, rtol=0)
        assert (whole[lo:hi, w:] == 0).all()


def test_dynamic_sampling_keeps_only_informative_groups(tmp_path):
    tr = make(
        tmp_path,
        [
            "trainer.steps=1",
            "trainer.batch_size=4",
            "algorithm.dynamic_sampling=true",
            "algorithm.dynamic_sampling_max_rounds=6",
            "sampling.temperature=3.0",  # odd prompts: the '7' count varies within a group
        ],
        reward="toy_first_digit",
    )
    m = tr.train_step()
    ro = tr.last_rollout
    assert len(ro) == 16 and m["dynamic/rounds"] >= 2  # half of each batch is even: refilled
    firsts = [int(e.prompt.split("+")[0]) for e in ro.entries]
    kept_groups = int(m["dynamic/kept"] * 4)
    assert all(f % 2 == 1 for f in firsts[: kept_groups * 4])
    r = ro.extras["reward"].total.view(4, 4)
    assert (r[:kept_groups].amax(1) > r[:kept_groups].amin(1)).all()
    assert m["dynamic/filled"] == 4 - kept_groups
    assert torch.isfinite(ro.data["adv"]).all() and math.isfinite(m["loss"])


def test_dynamic_sampling_round_budget_fills_with_dropped_groups(tmp_path):
    tr = make(
        tmp_path,
        ["trainer.steps=1", "trainer.batch_size=2", "algorithm.dynamic_sampling=true",
         "algorithm.dynamic_sampling_max_rounds=2"],
        reward="toy_len",  # toy_len of 8-token truncated outputs: mostly equal within a group
    )  # fmt: skip
    m = tr.train_step()
    assert m["dynamic/rounds"] <= 2 and len(tr.last_rollout) == 8
    assert m["dynamic/kept"] * 2 + m["dynamic/filled"] == 2


# -- reference policies ---------------------------------------------------------------------------
def test_tr_dpo_soft_sync_mixes_reference_every_tau_updates(tmp_path):
    tr = make(
        tmp_path,
        ["trainer.steps=2", "algorithm.reference_refresh=soft", "algorithm.reference_mix_alpha=0.25",
         "algorithm.reference_sync_every=2", "algorithm.beta=0.04"],
    )  # fmt: skip
    ref0 = {k: v.clone() for k, v in tr.reference.module().state_dict().items()}
    tr.train_step()  # update 1: no sync yet
    assert all(torch.equal(ref0[k], v) for k, v in tr.reference.module().state_dict().items())
    tr.train_step()  # update 2: π_ref <- α·π + (1 - α)·π_ref
    pol = tr.model.state_dict()
    for k, v in tr.reference.module().state_dict().items():
        torch.testing.assert_close(v, 0.25 * pol[k] + 0.75 * ref0[k], atol=1e-6, rtol=0)


def test_never_refresh_keeps_the_initial_reference(tmp_path):
    tr = make(
        tmp_path, ["trainer.steps=2", "trainer.iterations=2", "algorithm.reference_refresh=never"]
    )
    ref0 = {k: v.clone() for k, v in tr.reference.module().state_dict().items()}
    tr.train()
    assert all(torch.equal(ref0[k], v) for k, v in tr.reference.module().state_dict().items())
