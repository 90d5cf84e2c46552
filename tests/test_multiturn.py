"""Multi-turn rollouts (grpo_ar/generation/multiturn.py) on a tiny random Llama: the cache with
holes and observations equals a naive full recompute, teacher-forced log-probs of the model's
tokens equal the sampler's, the environment's tokens are recorded exactly and flagged, and
truncation by turn length, max_turns and the token budget is flagged."""

import pytest
import torch

from grpo_ar.generation.multiturn import TRUNCATION, Reply, TurnLimits, sample_turns
from grpo_ar.generation.params import SamplingParams, transform_logits
from grpo_ar.generation.scoring import token_logprobs
from grpo_ar.types import Entry, PromptBatch
from tiny import tiny_llama

# many end tokens: a random model ends its turns after a few tokens
EOS = tuple(range(2, 24))


def prompts(rows, pad=0):
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return PromptBatch(ids, mask, [Entry(str(r), ()) for r in rows])


class Script:
    """An environment that answers row r's turn k with `1 + (r + k) % 4` tokens 40 + r, 50 + k,
    ..., reward r + 10·k, and is done after `turns_of(r)` turns. Records what it was told."""

    def __init__(self, turns_of=lambda r: 3, sizes=None):
        self.turns_of, self.sizes, self.heard = turns_of, sizes, []

    def tokens(self, row, turn):
        size = 1 + (row + turn) % 4 if self.sizes is None else self.sizes(row, turn)
        return [40 + (row + i) % 30 if i % 2 == 0 else 50 + turn for i in range(size)]

    def __call__(self, turn, rows, said):
        self.heard.append((turn, rows, said))
        return [
            Reply(self.tokens(r, turn), reward=r + 10 * turn, done=turn + 1 >= self.turns_of(r))
            for r in rows
        ]


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


PARAMS = [
    SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.9, eos_token_ids=EOS),
    SamplingParams(max_new_tokens=5, temperature=1.2, top_k=8, eos_token_ids=EOS),
]


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("params", PARAMS)
def test_teacher_forced_logprobs_of_model_tokens_equal_the_samplers(model, params, fast):
    env = Script(turns_of=lambda r: 1 + r % 3)
    p = prompts([[5, 6, 7], [3, 4, 5, 6, 7, 8, 9]])
    r = sample_turns(
        model, p, 3, params, env, TurnLimits(4, 60), torch.Generator().manual_seed(0), fast=fast
    )
    assert (r.data["turns"] > 1).any(), "the test needs multi-turn trajectories"
    env_tok = r.completion_mask.bool() & ~r.model_mask.bool()
    assert env_tok.any()
    logp, _ = token_logprobs(model, r, params)
    m = r.model_mask.bool()
    torch.testing.assert_close(logp[m], r.sampling_logp[m], atol=1e-4, rtol=0)
    assert (r.sampling_logp[~m] == 0).all()
    # the plain full-sequence pass and the shared-prefix pass agree too
    plain, _ = token_logprobs(model, r, params, share_prefix=False, fused=False)
    torch.testing.assert_close(plain[m], r.sampling_logp[m], atol=1e-4, rtol=0)


def naive_greedy(model, prompt, params, env, row, limits):
    """One trajectory, greedily, recomputing the whole sequence at every token."""
    seq, traj, own = list(prompt), [], []
    for turn in range(limits.max_turns):
        said = []
        while True:
            logits = model(torch.tensor([seq])).logits[:, -1]
            tok = int(transform_logits(logits, params, None, False).argmax())
            seq.append(tok), traj.append(tok), own.append(True), said.append(tok)
            if tok in params.eos_token_ids or len(said) == params.max_new_tokens:
                break
        if tok not in params.eos_token_ids:
            return traj, own
        reply = env(turn, [row], [said])[0]
        if reply.done or turn == limits.max_turns - 1:
            return traj, own
        seq += reply.tokens
        traj += reply.tokens
        own += [False] * len(reply.tokens)
    return traj, own


@torch.no_grad()
@pytest.mark.parametrize("capacity", [None, 3])
@pytest.mark.parametrize("fast", [True, False])
def test_cached_turns_equal_a_naive_recompute(model, fast, capacity):
    """Greedy trajectories with holes, observations and rows leaving equal per-row recompute;
    with room for 3 slots at first, the cache grows on the way."""
    params = SamplingParams(max_new_tokens=6, eos_token_ids=EOS)
    limits = TurnLimits(5, 80)
    rows = [[5, 6, 7], [3, 4, 5, 6, 7, 8, 9], [11, 12]]
    env = Script(turns_of=lambda r: 2 + r % 3)
    r = sample_turns(
        model, prompts(rows), 1, params, env, limits, greedy=True, fast=fast, capacity=capacity
    )
    assert (r.data["turns"] >= 2).sum() >= 2
    for i, prompt in enumerate(rows):
        traj, own = naive_greedy(model, prompt, params, Script(lambda r: 2 + r % 3), i, limits)
        t = int(r.completion_mask[i].sum())
        assert r.completion_ids[i, :t].tolist() == traj
        assert r.model_mask[i, :t].bool().tolist() == own


def test_environment_sees_each_turn_and_its_tokens_are_recorded(model):
    params = PARAMS[0]
    env = Script(turns_of=lambda r: 3)
    r = sample_turns(model, prompts([[5, 6, 7]]), 2, params, env, TurnLimits(3, 200))
    for row in range(2):
        t = int(r.completion_mask[row].sum())
        ids, own = r.completion_ids[row, :t].tolist(), r.model_mask[row, :t].bool().tolist()
        # split the trajectory into alternating runs of model and environment tokens
        runs, kinds = [], []
        for tok, o in zip(ids, own):
            if not kinds or kinds[-1] != o or (o and runs[-1][-1] in EOS):
                runs.append([]), kinds.append(o)
            runs[-1].append(tok)
        said = [said[rows.index(row)] for _, rows, said in env.heard if row in rows]
        model_runs = [x for x, k in zip(runs, kinds) if k]
        cut = int(r.data["truncation"][row]) == TRUNCATION["turn_length"]
        assert cut or int(r.data["truncation"][row]) == TRUNCATION["none"]
        assert model_runs[: len(model_runs) - cut] == said  # a cut turn is not answered
        turns = len(model_runs)
        want_env = [env.tokens(row, k) for k in range(turns - 1)]
        assert [x for x, k in zip(runs, kinds) if not k] == want_env
        assert int(r.data["turns"][row]) == turns
        # rewards at the last token of each answered model turn
        ends = [i for i, (tok, o) in enumerate(zip(ids, own)) if o and tok in EOS]
        rewards = r.data["turn_reward"][row]
        assert rewards[ends].tolist() == [row + 10 * k for k in range(len(said))]
        assert float(rewards.sum()) == sum(row + 10 * k for k in range(len(said)))
    assert (r.data["turns"] == 3).any()
    assert (r.completion_ids[~r.completion_mask.bool()] == params.pad_token_id).all()


def test_truncation_by_max_turns_is_flagged(model):
    env = Script(turns_of=lambda r: 99)
    r = sample_turns(model, prompts([[5, 6, 7]]), 4, PARAMS[0], env, TurnLimits(2, 500))
    ended = r.data["truncation"]
    turn_cut = ended == TRUNCATION["turn_length"]
    assert ((ended == TRUNCATION["max_turns"]) | turn_cut).all() and r.truncated.all()
    assert (r.data["turns"][~turn_cut] == 2).all()


def test_truncation_by_token_budget_is_flagged(model):
    """A budget of 12 tokens with 11-token observations: the first reply never fits."""
    params = SamplingParams(max_new_tokens=6, eos_token_ids=EOS)
    env = Script(turns_of=lambda r: 99, sizes=lambda r, k: 11)
    r = sample_turns(model, prompts([[5, 6, 7], [8, 9]]), 3, params, env, TurnLimits(5, 12))
    ended = r.data["truncation"]
    assert r.truncated.all()
    assert set(ended.tolist()) <= {TRUNCATION["token_budget"], TRUNCATION["turn_length"]}
    assert (r.completion_mask.sum(1) <= 12).all()
    assert (r.data["turns"] == 1).all()  # no observation was appended
    assert not (r.completion_mask.bool() & ~r.model_mask.bool()).any()


def test_turns_cut_by_the_budget_mid_turn(model):
    """With 2-token observations a budget of 9 cuts a later model turn short: flagged, and no
    trajectory is longer than the budget."""
    params = SamplingParams(max_new_tokens=4, eos_token_ids=(2,))  # rarely ends on its own
    env = Script(turns_of=lambda r: 99, sizes=lambda r, k: 2)
    r = sample_turns(model, prompts([[5, 6, 7]]), 6, params, env, TurnLimits(9, 9))
    assert (r.completion_mask.sum(1) <= 9).all() and r.truncated.all()
    assert set(r.data["truncation"].tolist()) <= {1, 3}


def test_limits_and_params_are_validated(model):
    with pytest.raises(ValueError, match="max_turns"):
        TurnLimits(0, 10)
    bad = SamplingParams(max_new_tokens=4, eos_token_ids=EOS, min_new_tokens=1)
    with pytest.raises(ValueError, match="min_new_tokens"):
        sample_turns(model, prompts([[5]]), 1, bad, Script(), TurnLimits())
    with pytest.raises(ValueError, match="eos_token_ids"):
        sample_turns(model, prompts([[5]]), 1, SamplingParams(), Script(), TurnLimits())


def test_a_shard_samples_what_its_rows_get_in_the_whole_batch(model):
    """Prompts 2..3 of 4 sampled alone (a rank's share under torchrun) give exactly the whole
    batch's rows 4..7: a row's draws do not depend on how many steps other rows' turns took."""

    def env(turn, rows, said):  # the same answer for every row: shard-local row ids differ
        return [Reply([40 + turn, 41], reward=1.0, done=turn >= 2) for _ in rows]

    p = prompts([[5, 6, 7], [3, 4, 5, 6, 7, 8, 9], [11, 12], [9, 8, 7, 6]])
    params, limits = PARAMS[0], TurnLimits(3, 40)
    full = sample_turns(model, p, 2, params, env, limits, torch.Generator().manual_seed(4))
    part = PromptBatch(
        p.input_ids[2:], p.attention_mask[2:], p.entries[2:], extras={"shard": (2, 4)}
    )
    sub = sample_turns(model, part, 2, params, env, limits, torch.Generator().manual_seed(4))
    assert (full.data["turns"] > 1).sum() >= 4  # turns of different lengths before the last
    for i in range(4):
        t = int(sub.completion_mask[i].sum())
        assert t == int(full.completion_mask[4 + i].sum())
        assert torch.equal(sub.completion_ids[i, :t], full.completion_ids[4 + i, :t])
        # the same tokens; their log-probs up to float noise (another batch, other kernels)
        torch.testing.assert_close(
            sub.sampling_logp[i, :t], full.sampling_logp[4 + i, :t], atol=1e-5, rtol=0
        )
