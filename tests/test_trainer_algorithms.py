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


@pytest.mark.parametrize("loss", sorted(set(LOSSES) - {"toy_nan_loss"}))
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
    tr, m, moved = run_step(
        tmp_path,
        [f"algorithm.is_correction={mode}", "sampling.top_p=0.8", "sampling.train_filters=false"],
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
