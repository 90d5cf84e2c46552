"""GRPO over multi-turn trajectories through the unchanged Trainer: the environment's tokens
contribute nothing to the loss, the KL, the entropy or the gradient (against a naive per-row
reference), garbage under them changes nothing, per-turn credit, dynamic sampling and token-budget
micro-batches work on trajectories."""

import math
import pickle

import pytest
import torch

from grpo_ar.adapters.multiturn import MultiTurnAdapter, Trajectory
from grpo_ar.adapters.text import TextAdapter
from grpo_ar.config import load_config
from grpo_ar.core.turns import per_turn_advantages, returns_to_go
from grpo_ar.generation.params import SamplingParams
from grpo_ar.io.data import load_rows
from grpo_ar.io.run_files import append_samples
from grpo_ar.train.environments import Environment, Observation, rollout_metrics
from grpo_ar.train.step import StepStats
from grpo_ar.train.trainer import Trainer
from tiny import char_tokenizer, tiny_llama

EOS = tuple(range(2, 24))  # many end tokens: a random model ends its turns after a few


class Counter(Environment):
    """Answers turn k with the text "=k" (and k x's), reward k + (last char is a digit); done
    after `length` turns."""

    def __init__(self, length=3, **kw):
        super().__init__(**kw)
        self.length = length

    def reset(self, entry):
        return {"turn": 0}

    def step(self, state, text, tokens):
        state["turn"] += 1
        k = state["turn"]
        reward = k + float(text[-1:].isdigit())
        return Observation(text=f"={k}" + "x" * k, reward=reward, done=k >= self.length)

    def stats(self, state):
        return {"turns_seen": float(state["turn"])}


def make(tmp_path, overrides=(), env=None, max_new=6):
    tok = char_tokenizer()
    model = tiny_llama(vocab_size=len(tok))
    cfg = load_config(
        None,
        [
            f"sampling.max_new_tokens={max_new}",
            "trainer.steps=2",
            "trainer.batch_size=2",
            "trainer.lr=1e-3",
            "algorithm.group_size=4",
            f"log.run_dir={tmp_path}",
            "log.progress=false",
            *overrides,
        ],
    )
    sampling = SamplingParams(max_new_tokens=max_new, eos_token_ids=EOS)
    env = env or Counter(max_turns=4, max_tokens=60)
    adapter = MultiTurnAdapter(TextAdapter(tok, sampling), env)
    entries = load_rows([{"prompt": f"{i}+{i}=", "rewards": "environment"} for i in range(4)])
    return Trainer(cfg, model, adapter, entries)


def loss_and_grads(tr, mb, totals, stats):
    tr.model.train()
    logp, ent = tr.dist.score(mb)
    loss = tr.micro_loss(mb, logp, ent, 0, totals, 1, stats)
    params = [p for p in tr.model.parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, params)


def naive(tr, mb, beta, coef):
    """Σ over each row's model tokens of -A·π/sg(π) + β·k3(π_ref, π) - coef·H, over the number of
    model tokens, from one full forward per row (prompt + every real trajectory token)."""
    total, n_tok, ent_sum = 0.0, 0, 0.0
    ref_model = tr.reference.model
    for i in range(len(mb)):
        p = mb.prompts.input_ids[mb.prompt_index[i]][
            mb.prompts.attention_mask[mb.prompt_index[i]].bool()
        ]
        t = int(mb.completion_mask[i].sum())
        seq = torch.cat([p, mb.completion_ids[i, :t]])[None]
        logp = torch.log_softmax(tr.model(seq).logits[0].float(), -1)
        with torch.no_grad():
            ref = torch.log_softmax(ref_model(seq).logits[0].float(), -1)
        adv = float(mb.data["adv"][i])
        for j in range(t):
            if mb.model_mask[i, j] == 0:
                continue
            pos, tok = len(p) + j - 1, int(mb.completion_ids[i, j])
            lp, rl = logp[pos, tok], ref[pos, tok]
            h = -(logp[pos].exp() * logp[pos]).sum()
            total = (
                total
                - adv * torch.exp(lp - lp.detach())
                + beta * (torch.exp(rl - lp) - (rl - lp) - 1)
                - coef * h
            )
            ent_sum += float(h.detach())
            n_tok += 1
    return total / n_tok, ent_sum / n_tok


def test_environment_tokens_reach_no_loss_kl_entropy_or_gradient(tmp_path):
    tr = make(tmp_path, ["algorithm.beta=0.1", "algorithm.entropy_coef=0.01"])
    stats = StepStats()
    rollout = tr.generate(tr.prompts.next_batch(), stats)
    env_tok = rollout.completion_mask.bool() & ~rollout.model_mask.bool()
    assert env_tok.sum() > 10 and (rollout.data["turns"] > 1).sum() >= 4
    assert rollout.data["adv"].abs().sum() > 0
    (mb,), totals = tr.prepare(rollout, stats)
    assert int(totals[0]) == int(rollout.model_mask.sum())  # the global count: model tokens
    loss, grads = loss_and_grads(tr, mb, totals, stats)
    want, want_ent = naive(tr, mb, 0.1, 0.01)
    params = [p for p in tr.model.parameters() if p.requires_grad]
    want_grads = torch.autograd.grad(want, params)
    torch.testing.assert_close(loss, want.to(loss.dtype), atol=1e-5, rtol=0)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    assert stats.summary()["entropy"] == pytest.approx(want_ent, abs=1e-5)


def test_garbage_under_environment_tokens_changes_nothing(tmp_path):
    tr = make(tmp_path, ["algorithm.beta=0.1", "algorithm.is_correction=token_truncate"])
    stats = StepStats()
    rollout = tr.generate(tr.prompts.next_batch(), stats)
    (mb,), totals = tr.prepare(rollout, stats)
    loss, grads = loss_and_grads(tr, mb, totals, StepStats())
    env_tok = mb.completion_mask.bool() & ~mb.model_mask.bool()
    for key in ("ref_logp",):
        mb.data[key] = mb.data[key].masked_fill(env_tok, 123.0)
    mb.sampling_logp = mb.sampling_logp.masked_fill(env_tok, -77.0)
    loss2, grads2 = loss_and_grads(tr, mb, totals, StepStats())
    assert float(loss2.detach()) == float(loss.detach())
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2))


def test_a_training_step_logs_turn_metrics_and_decodes_trajectories(tmp_path):
    tr = make(tmp_path, ["algorithm.beta=0.0"])
    m = tr.train_step()
    assert math.isfinite(m["loss"])
    assert 1 <= m["turns/mean"] <= 4 and 0 < m["turns/env_token_frac"] < 1
    assert m["env/turns_seen"] == pytest.approx(m["turns/mean"], abs=1.0)
    out = tr.last_rollout.extras["outputs"]
    assert all(isinstance(o, Trajectory) for o in out)
    r = tr.last_rollout
    for i, o in enumerate(out):
        # the environment reward is the recorded per-turn rewards' sum; the output the last turn
        assert o.env_reward == pytest.approx(float(r.data["turn_reward"][i].sum()))
        assert str(o) == o.turns[-1] and len(o.turns) == int(r.data["turns"][i])
        assert all(f"={k}" in o.transcript for k in range(1, len(o.turns)))
    # outputs gathered over data-parallel ranks are pickled: a Trajectory survives it
    back = pickle.loads(pickle.dumps(out[0]))
    assert type(back) is Trajectory and str(back) == str(out[0])
    assert (back.turns, back.transcript, back.env_reward, back.stats) == (
        out[0].turns, out[0].transcript, out[0].env_reward, out[0].stats
    )  # fmt: skip


def test_per_turn_credit_gives_token_advantages(tmp_path):
    tr = make(
        tmp_path, ["algorithm.beta=0.0"], env=Counter(max_turns=4, max_tokens=60, credit="per_turn")
    )
    rollout = tr.generate(tr.prompts.next_batch(), StepStats())
    adv = rollout.data["adv"]
    assert adv.shape == rollout.completion_ids.shape
    assert (adv[~rollout.model_mask.bool()] == 0).all()
    # within one turn every token carries one advantage, and later turns differ from earlier
    row = int(rollout.data["turns"].argmax())
    own = rollout.model_mask[row].bool()
    assert len(set(adv[row][own].tolist())) == int(rollout.data["turns"][row])
    tr.update(rollout, StepStats())  # token-level advantages train
    # samples.jsonl shows a trajectory's mean advantage over the model's tokens
    rows = append_samples(tmp_path, rollout, 1, 3)
    own = rollout.model_mask
    want = ((adv * own).sum(-1) / own.sum(-1))[:3]
    assert [r["advantage"] for r in rows] == pytest.approx(want.tolist(), abs=1e-6)


def test_per_turn_advantages_by_hand():
    # 1 group of 2 trajectories, rewards at turn ends: row 0 (1, 2), row 1 (0, 1)
    r = torch.tensor([[0.0, 1.0, 0.0, 2.0], [1.0, 0.0, 0.0, 0.0]])
    assert returns_to_go(r).tolist() == [[3.0, 3.0, 2.0, 2.0], [1.0, 0.0, 0.0, 0.0]]
    adv = torch.tensor([0.5, -0.5])
    # G_0 = (3, 1): mean 2, std (unbiased) sqrt(2)
    got = per_turn_advantages(adv, r, 2, eps=0.0)
    s = math.sqrt(2)
    want = [
        [0.5 + 1 / s, 0.5 + 1 / s, 0.5, 0.5],
        [-0.5 - 1 / s, -0.5 - 2 / s, -0.5 - 2 / s, -0.5 - 2 / s],
    ]
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        per_turn_advantages(adv, r, 2, scale_by_std=False),
        torch.tensor([[1.5, 1.5, 0.5, 0.5], [-1.5, -2.5, -2.5, -2.5]]),
        atol=1e-6,
        rtol=0,
    )


def test_dynamic_sampling_and_token_budget_micro_batches_on_trajectories(tmp_path):
    tr = make(
        tmp_path,
        [
            "algorithm.beta=0.05",
            "algorithm.dynamic_sampling=true",
            "trainer.micro_batch_tokens=120",
        ],
    )
    m = tr.train_step()
    assert math.isfinite(m["loss"])
    r = tr.last_rollout
    assert r.data["model_mask"].shape == r.completion_mask.shape
    assert (r.data["model_mask"] <= r.completion_mask).all()


def test_environment_settings_are_validated():
    with pytest.raises(ValueError, match="credit"):
        Counter(credit="per_token")
    with pytest.raises(ValueError, match="max_turns"):
        Counter(max_turns=0)
    tok = char_tokenizer()
    bad = SamplingParams(max_new_tokens=4, eos_token_ids=EOS, cfg_scale=2.0)
    with pytest.raises(ValueError, match="cfg_scale"):
        MultiTurnAdapter(TextAdapter(tok, bad), Counter())


def test_held_out_evaluation_and_single_turn_rollouts(tmp_path):
    tr = make(tmp_path, ["algorithm.beta=0.0"])
    out = tr.evaluate(tr.train_entries[:2], greedy=True)
    assert math.isfinite(out["eval/greedy/reward"]) and out["eval/greedy/reward"] >= 1.0
    # a single-turn rollout has no trajectory metrics, and its model mask is its completion mask
    plain = TextAdapter(char_tokenizer(), SamplingParams(max_new_tokens=4, eos_token_ids=EOS))
    r = plain.sample(tr.model, plain.encode(tr.train_entries[:1]), 2)
    assert rollout_metrics(r) == {} and r.model_mask is r.completion_mask
    with pytest.raises(ValueError, match="one of messages, text, tokens"):
        Observation(text="a", tokens=(1,))
