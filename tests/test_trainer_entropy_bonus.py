"""The trainer's entropy bonus under gradient accumulation: each micro-batch subtracts
coef · its share of the step's bonus, checked against a naive recomputation from the scored
entropies (the normaliser is where a lost micro-batch factor would show)."""

import pytest
import torch
from test_trainer import make

from grpo_ar.core.corrections import high_entropy_mask
from grpo_ar.train.step import StepStats

COEF = 0.5


def bonus_parts(tmp_path, overrides):
    """(trainer's bonus, naive bonus) per micro-batch of one rollout with grad_accum=2."""
    tr = make(
        tmp_path,
        ["trainer.batch_size=4", "trainer.grad_accum=2", "algorithm.beta=0",
         f"algorithm.entropy_coef={COEF}", *overrides],
    )  # fmt: skip
    stats = StepStats()
    rollout = tr.generate(tr.prompts.next_batch(), stats)
    micro, totals = tr.prepare(rollout, stats)
    assert len(micro) == 2
    out = []
    for mb in micro:
        logp, ent = tr.dist.score(mb)
        with_bonus = tr.micro_loss(mb, logp, ent, 0, totals, len(micro), stats)
        tr.entropy.value = 0.0
        without = tr.micro_loss(mb, logp, ent, 0, totals, len(micro), stats)
        tr.entropy.value = COEF
        mask = mb.data["loss_mask"].bool()
        rho = tr.cfg.algorithm.top_entropy_quantile
        if rho < 1:  # TRL: the micro-batch's mean over its kept tokens / accumulation steps
            keep = high_entropy_mask(ent, mask, rho)
            naive = ent.detach()[keep].mean() / len(micro)
        else:  # every completion token: the step's mean, split over the micro-batches
            naive = ent.detach()[mask].sum() / totals.tokens
        out.append(((without - with_bonus).detach() / COEF, naive))
    return out


@pytest.mark.parametrize("rho", [1.0, 0.5])
def test_entropy_bonus_of_each_micro_batch_is_its_share_of_the_step(tmp_path, rho):
    parts = bonus_parts(tmp_path, [f"algorithm.top_entropy_quantile={rho}"])
    for got, want in parts:
        torch.testing.assert_close(got, want.to(got.dtype), atol=1e-6, rtol=0)
    assert all(float(want) > 0 for _, want in parts)
