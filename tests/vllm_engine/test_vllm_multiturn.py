"""Multi-turn trajectories sampled by the real vLLM engine (generation/vllm_turns.py): the
engine's log-probs of the model's tokens equal grpo_ar's teacher-forced log-probs to 1e-4, the
environment's tokens are recorded exactly and masked, truncation by max_turns and by the token
budget is flagged as the built-in sampler flags it, a tiny model replays a tool-calling
trajectory through the real calculator, and a GRPO run trains on engine trajectories."""

from __future__ import annotations

import torch
from conftest import tiny_vllm_llama

from grpo_ar.adapters.multiturn import MultiTurnAdapter
from grpo_ar.adapters.text import TextAdapter
from grpo_ar.config import load_config
from grpo_ar.generation.multiturn import TRUNCATION, Reply, TurnLimits, sample_turns
from grpo_ar.generation.params import SamplingParams
from grpo_ar.generation.scoring import token_logprobs
from grpo_ar.generation.vllm_backend import VllmBackend
from grpo_ar.generation.vllm_turns import engine_turns
from grpo_ar.io.data import load_rows
from grpo_ar.train.environments import Environment, Observation, rollout_metrics
from grpo_ar.train.tools import PARSERS, ToolCall, ToolEnvironment
from grpo_ar.train.trainer import Trainer
from grpo_ar.types import Entry, PromptBatch
from tiny import char_tokenizer

EOS = tuple(range(2, 24))  # many end tokens: a random model ends its turns after a few
PARAMS = SamplingParams(max_new_tokens=6, temperature=0.8, top_p=0.9, eos_token_ids=EOS)


def prompts(rows, pad=0):
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return PromptBatch(ids, mask, [Entry(str(r), ()) for r in rows])


class Script:
    """Answers row r's turn k with `size(r, k)` tokens 40 + (r + i) % 30, reward r + 10·k; done
    after `turns_of(r)` turns. Records what it was told."""

    def __init__(self, turns_of=lambda r: 3, size=lambda r, k: 1 + (r + k) % 4):
        self.turns_of, self.size, self.heard = turns_of, size, []

    def tokens(self, row, turn):
        return [40 + (row + i) % 30 for i in range(self.size(row, turn))]

    def __call__(self, turn, rows, said):
        self.heard.append((turn, rows, said))
        return [
            Reply(self.tokens(r, turn), reward=r + 10 * turn, done=turn + 1 >= self.turns_of(r))
            for r in rows
        ]


def pushed(engine, version, seed=0):
    """A tiny model whose weights the engine now holds."""
    model = tiny_vllm_llama(len(char_tokenizer()), seed=seed)
    VllmBackend(engine, PARAMS).sync(model, version)
    return model


def runs(ids, own, eos):
    """A trajectory split into alternating runs of model / environment tokens -> (runs, kinds)."""
    out, kinds = [], []
    for tok, o in zip(ids, own):
        if not kinds or kinds[-1] != o or (o and out[-1][-1] in eos):
            out.append([]), kinds.append(o)
        out[-1].append(tok)
    return out, kinds


def test_engine_trajectories_equal_teacher_forced_and_mask_the_environment(engine):
    model = pushed(engine, 1000)
    env = Script(turns_of=lambda r: 1 + r % 4)
    p = prompts([[5, 6, 7], [3, 4, 5, 6, 7, 8, 9], [11, 12]])
    r = engine_turns(engine, p, 4, PARAMS, env, TurnLimits(4, 60), seed=3)
    assert (r.data["turns"] >= 3).any(), "the test needs multi-turn trajectories"
    own, real = r.model_mask.bool(), r.completion_mask.bool()
    assert (real & ~own).sum() >= 10  # environment tokens to mask
    with torch.no_grad():
        logp, _ = token_logprobs(model, r, PARAMS)
    assert float((logp - r.sampling_logp).abs()[own].max()) <= 1e-4
    assert (r.sampling_logp[~own] == 0).all() and (r.completion_ids[~real] == 0).all()
    for row in range(r.completion_ids.shape[0]):
        t = int(real[row].sum())
        ids, mine = r.completion_ids[row, :t].tolist(), own[row, :t].tolist()
        parts, kinds = runs(ids, mine, EOS)
        said = [s[rows.index(row)] for _, rows, s in env.heard if row in rows]
        model_runs = [x for x, k in zip(parts, kinds) if k]
        code = int(r.data["truncation"][row])
        cut = code == TRUNCATION["turn_length"]
        assert model_runs[: len(model_runs) - cut] == said  # a cut turn is not answered
        # the environment's tokens, exactly, between the turns it answered
        assert [x for x, k in zip(parts, kinds) if not k] == [
            env.tokens(row, k) for k in range(len(model_runs) - 1)
        ]
        assert int(r.data["turns"][row]) == len(model_runs)
        if code == TRUNCATION["none"]:
            assert len(model_runs) == env.turns_of(row)
        ends = [i for i, (tok, o) in enumerate(zip(ids, mine)) if o and tok in EOS]
        rewards = r.data["turn_reward"][row]
        assert rewards[ends].tolist() == [row + 10 * k for k in range(len(said))]
    # the same rollout fields as the built-in multi-turn sampler
    ref = sample_turns(model, p, 4, PARAMS, Script(), TurnLimits(4, 60))
    assert set(r.data) == set(ref.data)
    for k, v in ref.data.items():
        assert r.data[k].dtype == v.dtype and r.data[k].shape[0] == v.shape[0], k


def naive_code(ids, own, turns, limits, max_new, eos, obs_size):
    """Why a trajectory ended, re-derived from its tokens (the environment never says done)."""
    last = [t for t, o in zip(ids, own) if o]
    ended_eos = bool(last) and last[-1] in eos and own[-1]
    if not ended_eos:
        return TRUNCATION["token_budget" if len(ids) >= limits.max_tokens else "turn_length"]
    if turns == limits.max_turns:
        return TRUNCATION["max_turns"]
    assert len(ids) + obs_size + 1 > limits.max_tokens
    return TRUNCATION["token_budget"]


def test_truncation_by_max_turns_and_token_budget_is_flagged(engine):
    pushed(engine, 1001)
    p = prompts([[5, 6, 7], [8, 9]])
    cases = [(TurnLimits(2, 500), TRUNCATION["max_turns"]), (TurnLimits(6, 14), 3)]
    for limits, want in cases:
        env = Script(turns_of=lambda r: 99, size=lambda r, k: 3)
        r = engine_turns(engine, p, 8, PARAMS, env, limits, seed=7)
        codes = r.data["truncation"].tolist()
        assert want in codes and r.truncated.all()
        assert (r.completion_mask.sum(1) <= limits.max_tokens).all()
        for row, code in enumerate(codes):
            t = int(r.completion_mask[row].sum())
            ids = r.completion_ids[row, :t].tolist()
            own = r.model_mask[row, :t].bool().tolist()
            turns = int(r.data["turns"][row])
            assert code == naive_code(ids, own, turns, limits, PARAMS.max_new_tokens, EOS, 3)


# -- a tool-calling trajectory: a char-level chat whose characters the engine's vocabulary has ---
CHAT = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<eos>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
if "call_words" not in PARSERS:

    @PARSERS.register("call_words")
    def parse_call_words(text):
        """`call NAME ARG` -> one call of NAME with its one argument `e` (else no call)."""
        words = text.split(" ")
        if len(words) == 3 and words[0] == "call":
            return [ToolCall(words[1], {"e": words[2]})]
        return []


def calc(e: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        e: digits and + - *, e.g. "12*34"
    """
    if not set(e) <= set("0123456789+-*"):
        raise ValueError(f"not arithmetic: {e!r}")
    return str(eval(e))  # noqa: S307 (checked above: arithmetic only)


def test_a_tiny_model_replays_a_tool_calling_trajectory_through_the_engine(engine):
    """Fit the engine's tiny Llama to one trajectory (a call, the calculator's result, the
    answer), push it, sample greedily through the vLLM backend: the real calculator answers
    the call and the model's answer follows the rendered result."""
    tok = char_tokenizer()
    tok.chat_template = CHAT
    env = ToolEnvironment([calc], max_turns=3, max_tokens=80, parser="call_words")
    sampling = SamplingParams(max_new_tokens=30, eos_token_ids=(tok.eos_token_id,))
    adapter = MultiTurnAdapter(TextAdapter(tok, sampling), env)
    entry = Entry([{"role": "user", "content": "12*34?"}], ())
    prompt = adapter.encode([entry])
    turn1 = "call calc 12*34<eos>"
    result = adapter.renderer.between([{"role": "tool", "content": "408"}], "<eos>")
    assert result == "tool: 408<eos>assistant: "
    target = tok(turn1 + result + "408<eos>", add_special_tokens=False)["input_ids"]
    seq = torch.cat([prompt.input_ids[0], torch.tensor(target)])[None]
    model = tiny_vllm_llama(len(tok), seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(300):  # until every next token of the trajectory is the argmax by a margin
        logits = model(seq).logits[0, :-1]
        top2 = logits[-len(target) :].topk(2, -1).values
        hit = (logits.argmax(-1) == seq[0, 1:])[-len(target) :].all()
        if hit and bool((top2[:, 0] - top2[:, 1] > 1.0).all()):
            break
        loss = torch.nn.functional.cross_entropy(logits, seq[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    backend = VllmBackend(engine, adapter.sampling, adapter=adapter)
    backend.sync(model, 1002)
    r = backend.generate(model, prompt, 1, greedy=True)
    t = int(r.completion_mask[0].sum())
    assert r.completion_ids[0, :t].tolist() == target, tok.decode(r.completion_ids[0, :t])
    n1 = len(tok(turn1, add_special_tokens=False)["input_ids"])
    n_env = len(tok(result, add_special_tokens=False)["input_ids"])
    assert r.model_mask[0, :t].bool().tolist() == [True] * n1 + [False] * n_env + [True] * (
        t - n1 - n_env
    )
    (out,) = adapter.decode(r)
    assert str(out) == "408" and out.turns[0] == "call calc 12*34"
    assert out.stats == {"tool_calls": 1.0, "tool_failures": 0.0}
    m = rollout_metrics(r)
    assert m["turns/mean"] == 2.0 and m["tools/failure_frequency"] == 0.0


class Counter(Environment):
    """Answers turn k with the text "=k", reward k; done after 3 turns."""

    def reset(self, entry):
        return {"turn": 0}

    def step(self, state, text, tokens):
        state["turn"] += 1
        k = state["turn"]
        return Observation(text=f"={k}", reward=float(k), done=k >= 3)


def test_grpo_trains_on_engine_trajectories(engine, tmp_path):
    """Two GRPO steps whose rollouts are the engine's trajectories (weights pushed before each):
    the trainer's first-pass log-probs equal the engine's on the model's tokens."""
    tok = char_tokenizer()
    cfg = load_config(
        None,
        [
            "sampling.max_new_tokens=6",
            f"sampling.eos_token_ids={list(EOS)}",
            "trainer.steps=2",
            "trainer.batch_size=2",
            "trainer.lr=1e-3",
            "algorithm.group_size=4",
            "algorithm.beta=0.0",
            "data.rewards=[{name: environment}]",
            f"log.run_dir={tmp_path}",
            "log.progress=false",
        ],
    )
    adapter = MultiTurnAdapter(TextAdapter(tok, cfg.sampling), Counter(max_turns=3, max_tokens=40))
    entries = load_rows(
        [{"prompt": f"{i}+{i}="} for i in range(4)], default_rewards=cfg.data.rewards
    )
    backend = VllmBackend(engine, adapter.sampling, adapter=adapter)
    tr = Trainer(cfg, tiny_vllm_llama(len(tok)), adapter, entries, backend=backend)
    hist = tr.train()
    assert engine.version == tr.updates - 1
    assert tr.last_rollout is not None and "model_mask" in tr.last_rollout.data
    for h in hist:
        assert h["turns/mean"] > 1.0 and 0 < h["turns/env_token_frac"] < 1
        assert h["sampling/logp_diff/max"] <= 1e-4
        assert torch.isfinite(torch.tensor(h["loss"]))
