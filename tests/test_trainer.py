import math

import pytest
import torch

from grpo_ar.adapters.text import TextAdapter
from grpo_ar.config import load_config
from grpo_ar.core import LOSSES, PolicyLoss
from grpo_ar.io.data import load_rows
from grpo_ar.rewards import REWARDS, per_sample, register_reward
from grpo_ar.train.trainer import Trainer
from tiny import char_tokenizer, tiny_llama

if "toy_sevens" not in REWARDS:

    @register_reward("toy_sevens")
    @per_sample
    def toy_sevens(output: str) -> float:
        """Toy reward: share of '7' characters in an 8-character budget."""
        return output.count("7") / 8

    @register_reward("toy_len")
    @per_sample
    def toy_len(output: str) -> float:
        return float(len(output))

    @register_reward("toy_flaky")
    @per_sample
    def toy_flaky(output: str) -> float:
        if "3" in output:
            raise RuntimeError("judge unavailable")
        return float(len(output))


@pytest.fixture
def nan_loss():
    """A loss that is NaN everywhere, registered only for the test that needs it."""

    def toy_nan_loss(logp, old_logp, adv, mask):
        z = torch.zeros_like(logp)
        return PolicyLoss(logp * float("nan"), z, z)

    LOSSES.register("toy_nan_loss")(toy_nan_loss)
    yield "toy_nan_loss"
    LOSSES._fns.pop("toy_nan_loss")


def make(tmp_path, overrides=(), reward="toy_sevens", seed=0, n_entries=8):
    tok = char_tokenizer()
    model = tiny_llama(vocab_size=len(tok), seed=seed)
    cfg = load_config(
        None,
        [
            "sampling.max_new_tokens=8",
            "trainer.steps=4",
            "trainer.batch_size=4",
            "trainer.lr=3e-3",
            "algorithm.group_size=4",
            f"log.run_dir={tmp_path}",
            "log.progress=false",
            *overrides,
        ],
    )
    entries = load_rows([{"prompt": f"{i}+{i}=", "rewards": reward} for i in range(n_entries)])
    return Trainer(cfg, model, TextAdapter(tok, cfg.sampling), entries)


def params(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


# plain SGD at lr 1 without clipping: the weights move by the accumulated gradient itself (Adam's
# first step is ~lr·sign(g), so fp32 noise in a near-zero gradient shows as an O(lr) difference)
SGD = ("trainer.optimizer=torch.optim.SGD", "trainer.lr=1.0", "trainer.max_grad_norm=0")


def test_grad_accum_gives_the_full_batch_update(tmp_path):
    """Micro-batching with global counts: 1 vs 2 vs 4 micro-batches, identical weights."""
    results = []
    for accum in (1, 2, 4):
        tr = make(
            tmp_path / str(accum),
            [
                f"trainer.grad_accum={accum}",
                "trainer.steps=1",
                "algorithm.aggregation=seq_mean_token_mean",
                *SGD,
            ],
            reward="toy_len",
        )
        before = params(tr)
        tr.train_step()
        results.append(params(tr))
        assert max((results[-1][k] - before[k]).abs().max() for k in before) > 1e-4  # a real update
    for other in results[1:]:
        for k in results[0]:
            torch.testing.assert_close(other[k], results[0][k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_token_budget_micro_batches_give_the_full_batch_update(tmp_path, agg):
    """trainer.micro_batch_tokens packs groups by length and trims padding per micro-batch
    (trimming itself: tests/test_speed_microbatch.py): same weights as one micro-batch."""
    results, shapes = [], []
    for budget in (0, 40):
        tr = make(
            tmp_path / str(budget),
            [
                f"trainer.micro_batch_tokens={budget}",
                "trainer.steps=1",
                f"algorithm.aggregation={agg}",
                *SGD,
            ],
            reward="toy_len",
        )
        seen, score = [], tr.adapter.token_logprobs

        def spy(m, r, score=score, seen=seen, **kw):
            if torch.is_grad_enabled():  # the policy passes (not the no-grad reference pass)
                seen.append(r.completion_ids.shape)
            return score(m, r, **kw)

        tr.adapter.token_logprobs = spy
        tr.train_step()
        results.append(params(tr))
        shapes.append(seen)
    assert len(shapes[0]) == 1 and len(shapes[1]) > 1  # the budget really split the batch
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], atol=1e-6, rtol=0)


def test_first_pass_is_on_policy_and_later_passes_clip(tmp_path):
    tr = make(
        tmp_path,
        ["algorithm.grpo_iters=3", "trainer.lr=5e-2", "algorithm.beta=0"],
        reward="toy_len",
    )
    m = tr.train_step()
    # pass 1 has ratio exactly 1 (old = sg(logp)); the large lr moves later passes off-policy
    assert m["clip/low"] + m["clip/high"] > 0
    tr2 = make(
        tmp_path / "b",
        ["algorithm.grpo_iters=1", "trainer.lr=5e-2", "algorithm.beta=0"],
        reward="toy_len",
    )
    m2 = tr2.train_step()
    assert m2["clip/low"] == 0 and m2["clip/high"] == 0


def test_learns_toy_reward(tmp_path):
    tr = make(tmp_path, ["trainer.steps=30", "algorithm.grpo_iters=2", "trainer.iterations=3"])
    hist = tr.train()
    first = sum(h["reward/mean"] for h in hist[:5]) / 5
    last = sum(h["reward/mean"] for h in hist[-5:]) / 5
    assert last > first + 0.3, (first, last)


def test_failed_rewards_are_skipped_not_fatal(tmp_path, caplog):
    tr = make(tmp_path, ["trainer.steps=3"], reward="toy_flaky")
    hist = tr.train()
    assert len(hist) == 3
    failed = [h["reward/toy_flaky/failures"] for h in hist]
    assert sum(failed) > 0, "the flaky reward never failed: the test needs a '3' in some output"
    assert all(math.isfinite(h["loss"]) for h in hist)
    for p in tr.model.parameters():
        assert torch.isfinite(p).all()


def test_non_finite_loss_skips_the_update(tmp_path, caplog, nan_loss):
    tr = make(tmp_path, [f"algorithm.loss={nan_loss}"])
    before = params(tr)
    m = tr.train_step()
    assert m["skipped_updates"] == 1
    after = params(tr)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "update skipped" in caplog.text


def test_beta_zero_builds_no_reference(tmp_path):
    assert make(tmp_path, ["algorithm.beta=0"]).reference is None
    assert make(tmp_path / "b").reference is not None


def test_reference_refreshed_after_each_iteration(tmp_path):
    tr = make(tmp_path, ["trainer.steps=4", "trainer.iterations=2"])
    ref0 = {k: v.clone() for k, v in tr.reference.model.state_dict().items()}
    tr.train_step()  # mid-iteration: reference still the initial policy
    assert all(torch.equal(ref0[k], v) for k, v in tr.reference.model.state_dict().items())
    tr.train_step()  # iteration end: reference <- policy
    pol = tr.model.state_dict()
    assert all(torch.equal(pol[k], v) for k, v in tr.reference.model.state_dict().items())
    assert not all(torch.equal(ref0[k], pol[k]) for k in ref0)


def test_never_refresh_keeps_initial_reference(tmp_path):
    tr = make(
        tmp_path, ["trainer.steps=2", "trainer.iterations=2", "algorithm.reference_refresh=never"]
    )
    ref0 = {k: v.clone() for k, v in tr.reference.model.state_dict().items()}
    tr.train_step()
    tr.train_step()
    assert all(torch.equal(ref0[k], v) for k, v in tr.reference.model.state_dict().items())


def test_resume_continues_identically(tmp_path):
    full = make(
        tmp_path / "full", ["trainer.steps=4", "trainer.iterations=2", "algorithm.grpo_iters=2"]
    )
    hist_full = full.train()

    part = make(
        tmp_path / "part", ["trainer.steps=2", "trainer.iterations=1", "algorithm.grpo_iters=2"]
    )
    part.train()
    resumed = make(
        tmp_path / "part",
        ["trainer.steps=4", "trainer.iterations=2", "algorithm.grpo_iters=2"],
        seed=123,
    )
    resumed.resume()
    assert resumed.step == 2
    hist_rest = resumed.train()
    assert [h["reward/mean"] for h in hist_rest] == [h["reward/mean"] for h in hist_full[2:]]
    a, b = params(full), params(resumed)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)


def test_resume_refuses_bf16_fp16_switch(tmp_path):
    tr = make(tmp_path, ["trainer.steps=1", "model.dtype=bfloat16"])
    tr.train()
    other = make(tmp_path, ["trainer.steps=2", "model.dtype=float16"])
    with pytest.raises(ValueError, match="never switch between bf16 and fp16"):
        other.resume()


def test_checkpoint_weights_round_trip_with_tied_embeddings(tmp_path):
    from grpo_ar.io.checkpoint import latest_checkpoint, load_weights

    tr = make(tmp_path, ["trainer.steps=1"], reward="toy_len")
    tr.model.config.tie_word_embeddings = True
    tr.model.tie_weights()
    tr.train()
    ckpt = latest_checkpoint(tmp_path)
    fresh = tiny_llama(vocab_size=tr.model.config.vocab_size, seed=99)
    fresh.config.tie_word_embeddings = True
    fresh.tie_weights()
    load_weights(fresh, ckpt / "model.safetensors")
    for k, v in tr.model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()


def test_keep_checkpoints_prunes_old_ones(tmp_path):
    tr = make(
        tmp_path,
        ["trainer.steps=3", "trainer.save_every=1", "log.keep_checkpoints=2"],
        reward="toy_len",
    )
    tr.train()
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [
        "step_000002",
        "step_000003",
    ]


def test_dropout_disabled_so_training_logprobs_match_sampling(tmp_path):
    tr = make(tmp_path, ["trainer.steps=1"])
    from transformers import LlamaForCausalLM

    cfg = tr.model.config
    cfg.attention_dropout = 0.5
    model = LlamaForCausalLM(cfg)
    tr2 = Trainer(tr.cfg, model, tr.adapter, tr.train_entries)
    prompts = tr2.adapter.encode(tr.train_entries[:2])
    rollout = tr2.adapter.sample(
        model.eval(), prompts, 2, generator=torch.Generator().manual_seed(0)
    )
    model.train()
    logp, _ = tr2.adapter.token_logprobs(model, rollout)
    torch.testing.assert_close(logp, rollout.sampling_logp, atol=1e-4, rtol=0)
