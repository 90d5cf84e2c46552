"""Multi-turn trajectories sampled by a vLLM engine (`generation.vllm_engine.Engine` or the
server's client): the rollout `multiturn.sample_turns` records, drawn by the engine.

Each turn is one `engine.generate` call for every live trajectory of the batch: turn 0 submits
each first prompt once with n = G; later turns submit each trajectory's whole token prefix
(first prompt, the model's turns, the environment's observations) as `prompt_token_ids` with
n = 1, and vLLM's prefix cache reuses the KV of everything already computed. The engine's
processed log-probs are recorded for the model's tokens; the environment's tokens get 0 and stay
outside `data["model_mask"]`.

What it equals: `sample_turns` with the same draws (tests/vllm_engine/test_vllm_multiturn.py
holds the recorded log-probs equal to teacher-forced scoring of the trajectory to 1e-4); the
turn limits, token budget and truncation codes are the same function (`multiturn.turn_outcome`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..types import PromptBatch, Rollout
from .multiturn import TRUNCATION, Reply, Respond, TurnLimits, check_params, turn_outcome
from .params import SamplingParams
from .vllm_engine import request_params

# a later turn's request seeds: far from turn 0's (seed + prompt index) and from each other
TURN_SEED_STRIDE = 1_000_003


class Row:
    """One rollout row being built: tokens after the first prompt with their records."""

    def __init__(self) -> None:
        self.tok: list[int] = []
        self.logp: list[float] = []
        self.own: list[bool] = []  # sampled by the model
        self.reward: list[float] = []

    def add(self, tok: list[int], logp: list[float] | None) -> None:
        """The model's tokens with their log-probs, or the environment's (`logp` None)."""
        self.tok += tok
        self.logp += logp if logp is not None else [0.0] * len(tok)
        self.own += [logp is not None] * len(tok)
        self.reward += [0.0] * len(tok)


def engine_turns(
    engine: Any, prompts: PromptBatch, group_size: int, params: SamplingParams,
    respond: Respond, limits: TurnLimits, seed: int, greedy: bool = False,
) -> Rollout:  # fmt: skip
    """G trajectories per prompt, turn by turn through `engine.generate` (see the module
    docstring); the limits and records are those of `multiturn.sample_turns`."""
    check_params(params)
    g, n = group_size, len(prompts) * group_size
    first = [
        ids[m.bool()].tolist()
        for ids, m in zip(prompts.input_ids.cpu(), prompts.attention_mask.cpu())
    ]
    rows = [Row() for _ in range(n)]
    used, turns, reason = [0] * n, [0] * n, [TRUNCATION["none"]] * n
    eos = set(params.eos_token_ids)
    base = request_params(params, greedy)
    live = list(range(n))
    for turn in range(limits.max_turns):
        caps = [min(params.max_new_tokens, limits.max_tokens - used[r]) for r in live]
        if turn == 0:  # every row is live with the same cap: one request per prompt, n = G
            out = engine.generate(first, g, {**base, "max_tokens": caps[0]}, seed)
        else:
            prefixes = [first[r // g] + rows[r].tok for r in live]
            kws = [{**base, "max_tokens": c} for c in caps]
            out = engine.generate(prefixes, 1, kws, seed + turn * TURN_SEED_STRIDE)
        asked, start = [], {r: len(rows[r].tok) for r in live}
        for r, (ids, lps) in zip(live, out):
            rows[r].add(list(ids), list(lps))
            used[r] += len(ids)
            turns[r] += 1
            if ids and ids[-1] in eos:
                asked.append(r)
        said = [rows[r].tok[start[r] :] for r in asked]  # the model's tokens of this turn
        replies = respond(turn, asked, said) if asked else []
        if len(replies) != len(asked):
            raise ValueError(f"the environment answered {len(replies)} of {len(asked)} turns")
        reply_of: dict[int, Reply] = dict(zip(asked, replies))
        going = []
        for r in live:
            reply = reply_of.get(r)
            if reply is not None:
                rows[r].reward[-1] += float(reply.reward)  # at the turn's last token
            code = turn_outcome(reply, turn, used[r], limits)
            if code is not None:
                reason[r] = code
                continue
            tokens = list(reply.tokens) if reply is not None else []
            rows[r].add(tokens, None)
            used[r] += len(tokens)
            going.append(r)
        live = going
        if not live:
            break
    return _rollout(prompts, g, rows, turns, reason, params.pad_token_id)


def _rollout(
    prompts: PromptBatch, g: int, rows: list[Row], turns: list[int], reason: list[int],
    pad: int,
) -> Rollout:  # fmt: skip
    """The rows as the Rollout `sample_turns` returns (right-padded, the same `data` keys)."""
    n, width = len(rows), max(1, max(len(r.tok) for r in rows))
    tok = torch.full((n, width), pad, dtype=torch.long)
    real, own = torch.zeros(n, width), torch.zeros(n, width)
    logp, reward = torch.zeros(n, width), torch.zeros(n, width)
    for i, r in enumerate(rows):
        k = len(r.tok)
        tok[i, :k] = torch.tensor(r.tok, dtype=torch.long)
        real[i, :k] = 1.0
        own[i, :k] = torch.tensor(r.own, dtype=torch.float32)
        logp[i, :k] = torch.tensor(r.logp, dtype=torch.float32)
        reward[i, :k] = torch.tensor(r.reward, dtype=torch.float32)
    device = prompts.input_ids.device
    index = torch.arange(len(prompts), device=device).repeat_interleave(g)
    code = torch.tensor(reason, dtype=torch.long, device=device)
    return Rollout(
        prompts=prompts,
        group_size=g,
        completion_ids=tok.to(device),
        completion_mask=real.to(device),
        sampling_logp=(logp * own).to(device),
        truncated=code != TRUNCATION["none"],
        prompt_index=index,
        group_ids=index.clone(),
        data={
            "model_mask": own.to(device),
            "turn_reward": reward.to(device),
            "turns": torch.tensor(turns, dtype=torch.long, device=device),
            "truncation": code,
        },
    )
