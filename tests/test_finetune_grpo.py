"""GRPO through the Trainer with each fine-tuning method: the run completes, every update lowers
the reward-weighted loss (-Σ A·logp) of the rollout it learned from, and an adapter's reference
stays the base until the iteration's refresh, then equals the policy of that moment."""

import copy

import pytest
import torch

pytest.importorskip("peft", reason="the peft extra is not installed")
pytest.importorskip("lycoris", reason="the lycoris extra is not installed")

from grpo_ar.adapters.text import TextAdapter
from grpo_ar.config import load_config
from grpo_ar.finetune import FinetuneConfig, build_finetune
from grpo_ar.io.data import load_rows
from grpo_ar.rewards import REWARDS, per_sample, register_reward
from grpo_ar.train.trainer import Trainer
from tiny import char_tokenizer, tiny_llama

if "ft_digits" not in REWARDS:

    @register_reward("ft_digits")
    @per_sample
    def ft_digits(output: str) -> float:
        """Toy reward: share of digits in an 8-character budget (dense: most groups vary)."""
        return sum(c.isdigit() for c in output) / 8


METHODS = {
    "full": (FinetuneConfig(), 3e-3),
    "peft": (FinetuneConfig(method="peft", rank=8, alpha=16.0), 1e-2),
    "lycoris": (FinetuneConfig(method="lycoris", rank=8, alpha=16.0), 1e-2),
}


def make(tmp_path, method, overrides=()):
    tok = char_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    base = copy.deepcopy(model)
    ft_cfg, lr = METHODS[method]
    cfg = load_config(
        None,
        [
            "sampling.max_new_tokens=8",
            "trainer.batch_size=4",
            f"trainer.lr={lr}",
            "algorithm.group_size=4",
            "algorithm.beta=0.04",
            f"log.run_dir={tmp_path}",
            "log.progress=false",
            *overrides,
        ],
    )
    ft = build_finetune(model, ft_cfg, need_reference=True)
    entries = load_rows([{"prompt": f"{i}+{i}=", "rewards": "ft_digits"} for i in range(8)])
    adapter = TextAdapter(tok, cfg.sampling)
    return Trainer(cfg, ft.model, adapter, entries, finetune=ft), ft, base


def reward_weighted_loss(trainer, rollout):
    """-Σ A·logp / tokens on a rollout: the policy-gradient surrogate GRPO descends."""
    with torch.no_grad():
        logp, _ = trainer.adapter.token_logprobs(trainer.model, rollout)
    adv = rollout.data["adv"]
    adv = adv if adv.dim() == 2 else adv[:, None]
    return float(-(adv * logp).sum() / rollout.completion_mask.sum())


def record_loss_drops(trainer):
    """Wrap `trainer.update`: the surrogate on each step's rollout before and after its update."""
    drops, update = [], trainer.update

    def measured(rollout, stats):
        before = reward_weighted_loss(trainer, rollout)
        update(rollout, stats)
        if rollout.data["adv"].abs().sum() > 0:
            drops.append(before - reward_weighted_loss(trainer, rollout))

    trainer.update = measured
    return drops


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_run_lowers_the_reward_weighted_loss(tmp_path, method, seed):
    tr, ft, base = make(
        tmp_path, method, ["trainer.steps=6", "trainer.iterations=2", f"trainer.seed={seed}"]
    )
    drops = record_loss_drops(tr)
    from grpo_ar.train.step import StepStats

    probe = tr.generate(tr.prompts.next_batch(), StepStats())
    ref_before = tr.reference.logprobs(tr.adapter, probe)
    hist = [tr.train_step() for _ in range(2)]
    # mid-iteration: the adapter reference is still the base, bitwise
    if method != "full":
        assert torch.equal(tr.reference.logprobs(tr.adapter, probe), ref_before)
        assert torch.equal(ref_before, tr.adapter.token_logprobs(base, probe)[0])
        assert tr.reference.state_dict() == {}
    hist.append(tr.train_step())  # step 3 ends iteration 1: reference <- policy
    policy_at_refresh = tr.adapter.token_logprobs(tr.model, probe)[0].detach()
    assert torch.equal(tr.reference.logprobs(tr.adapter, probe), policy_at_refresh)
    hist += [tr.train_step() for _ in range(2)]
    assert torch.equal(tr.reference.logprobs(tr.adapter, probe), policy_at_refresh)
    hist.append(tr.train_step())
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert hist[-1]["kl"] > 0
    # every update lowers the reward-weighted loss of the rollout it learned from
    assert len(drops) >= 4 and all(d > 0 for d in drops), drops


def test_soft_sync_mixes_an_affine_adapter_and_refuses_lora(tmp_path):
    """TR-DPO through the trainer: lycoris ia3 mixes; peft LoRA is refused up front."""
    soft = ["trainer.steps=2", "algorithm.reference_refresh=soft"]
    soft += ["algorithm.reference_sync_every=1", "algorithm.reference_mix_alpha=0.5"]
    METHODS["ia3"] = (FinetuneConfig(method="lycoris", algo="ia3"), 3e-2)
    try:
        tr, ft, _ = make(tmp_path, "ia3", soft)
        tr.train_step()
        frozen = tr.reference.state_dict()
        live = ft.state_dict()
        assert frozen and all(torch.allclose(frozen[k], 0.5 * live[k]) for k in live)
    finally:
        del METHODS["ia3"]
    with pytest.raises(ValueError, match="not exact here: peft lora"):
        make(tmp_path / "peft", "peft", soft)  # the Trainer refuses before any step
