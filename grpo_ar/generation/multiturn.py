"""Multi-turn rollouts with the KV-cached sampler: the model writes a turn (up to EOS), an
environment answers with tokens, the model continues after them, and so on; each trajectory
(every token after the first prompt, the model's and the environment's) is one rollout row.

Rows move through a turn in lockstep. A row that has ended its turn waits with its cache slots
masked out ("holes": attention mask 0, position not advanced), and observations are fed
left-padded in one forward per turn into the same cache, so the prompt and earlier turns are
never recomputed. Every real token attends to exactly the real tokens before it, at the same
positions as in one teacher-forced pass over the compacted trajectory
(`generation.scoring.token_logprobs`), which the tests hold equal to the recorded log-probs.

What the rollout records beyond a single-turn one (`data`, sliced and joined with the rollout):
- `model_mask` (N, T) float: 1 on the tokens the model sampled (`Rollout.model_mask`); the
  environment's tokens are in `completion_mask` (attended) but not here (no loss, KL, entropy);
- `turn_reward` (N, T) float: each environment reply's reward at the last token of the turn it
  answered;
- `turns` (N,) long: model turns taken; `truncation` (N,) long: a `TRUNCATION` code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..types import PromptBatch, Rollout
from .decode_step import Decoder, fast_step_for
from .params import SamplingParams, transform_logits
from .sampler import Draw, inverse_cdf

# why a trajectory ended early (`data["truncation"]`); 0 = it ended by the environment's `done`
TRUNCATION = {"none": 0, "turn_length": 1, "max_turns": 2, "token_budget": 3}


@dataclass(frozen=True)
class Reply:
    """The environment's answer to one model turn, in tokens."""

    tokens: Sequence[int] = ()
    """Observation tokens appended to the trajectory (attended, never trained on)."""
    reward: float = 0.0
    """Per-turn reward, recorded at the turn's last token (`data["turn_reward"]`)."""
    done: bool = False
    """The trajectory is over (tokens are then ignored)."""


# (turn, rows, tokens of each row's model turn) -> one Reply per row; rows are rollout rows
Respond = Callable[[int, list[int], list[list[int]]], list[Reply]]


@dataclass(frozen=True)
class TurnLimits:
    """How long a trajectory may get."""

    max_turns: int = 4
    """Model turns per trajectory; one still unfinished after them is truncated."""
    max_tokens: int = 512
    """Trajectory tokens after the first prompt, the model's and the environment's together."""

    def __post_init__(self) -> None:
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


# (respond, limits) -> the rollout of a batch's trajectories: `sample_turns` here, or a rollout
# backend's own multi-turn loop (`generation.vllm_turns.engine_turns`)
TurnSampler = Callable[[Respond, TurnLimits], Rollout]


@runtime_checkable
class Trajectories(Protocol):
    """An adapter whose rollouts are multi-turn trajectories (adapters/multiturn.py): it owns the
    environment, a rollout backend owns the sampling loop and passes it in as `turns`."""

    def trajectories(self, prompts: PromptBatch, group_size: int, turns: TurnSampler) -> Rollout:
        """G trajectories per prompt: episodes started, `turns(respond, limits)` run, the
        environment's statistics added to the rollout."""
        ...


def turn_outcome(reply: Reply | None, turn: int, used: int, limits: TurnLimits) -> int | None:
    """After a model turn: None when the trajectory goes on, else its `TRUNCATION` code (0: the
    environment said done). `reply` is None for a turn cut by its length (not asked); `used`
    counts the trajectory's tokens including this turn's (not yet the observation's)."""
    if reply is None:  # cut by its length: by the budget, or by the turn limit
        return TRUNCATION["token_budget" if used >= limits.max_tokens else "turn_length"]
    if reply.done:
        return TRUNCATION["none"]
    if turn == limits.max_turns - 1:
        return TRUNCATION["max_turns"]
    if used + len(reply.tokens) + 1 > limits.max_tokens:  # no room for a model token after
        return TRUNCATION["token_budget"]
    return None


def check_params(params: SamplingParams) -> None:
    """Refuse what a multi-turn rollout cannot reproduce in scoring: position-dependent masks
    (a trajectory position is not a turn position), CFG, token subsets that would give the
    environment's tokens log-prob -inf, and turns without an end token."""
    bad = [
        (params.uses_cfg, f"cfg_scale={params.cfg_scale}", "set cfg_scale = 1"),
        (bool(params.position_ranges), "position_ranges", "leave position_ranges empty"),
        (bool(params.allowed_ranges), "allowed_ranges", "leave allowed_ranges empty"),
        (params.min_new_tokens > 0, "min_new_tokens", "set min_new_tokens = 0"),
        (not params.eos_token_ids, "no eos_token_ids", "give the token that ends a turn"),
    ]
    for hit, what, fix in bad:
        if hit:
            raise ValueError(f"multi-turn rollouts do not support {what}: {fix}")


class TurnDecoder(Decoder):
    """`Decoder` whose rows may skip a step (a hole in their cache) and take several tokens at
    once (an observation), with cache storage grown as trajectories lengthen."""

    def __init__(
        self, model: Any, params: SamplingParams, capacity: int, fast: bool, positions: int
    ) -> None:
        # the base class sizes the cache and the fast step's RoPE table by max_new_tokens
        super().__init__(model, replace(params, max_new_tokens=capacity), True, fast)
        self.positions = positions  # positions after the prompt that a trajectory may reach

    def start(self, ids: Tensor, mask: Tensor, group_size: int) -> Tensor:
        """(P, L) prompts -> (P·G, V) logits of the first token (prefix shared per group)."""
        logits = self.prefill(ids, mask, group_size, share_prefix=True)
        if self.fast is not None and self.positions > self.params.max_new_tokens:
            # cache slots (holes included) may grow later; RoPE positions stop at the budget
            self.fast = fast_step_for(self.call, ids.shape[1] + self.positions)
        return logits

    def reserve(self, slots: int) -> None:
        """Room for `slots` more cache slots in the mask and the preallocated cache layers
        (grown by half again when short, like a list)."""
        need = self.length + slots
        size = need + need // 2
        if need > self.mask.shape[1]:
            self.mask = F.pad(self.mask, (0, size - self.mask.shape[1]))
        for layer in self.cache.layers:
            store = getattr(layer, "k_store", None)
            if store is None or store.shape[-2] >= need:
                continue

            def grow(x: Tensor) -> Tensor:  # (B, H, S, D) -> (B, H, size, D), filled part kept
                return torch.cat([x, x.new_empty(*x.shape[:2], size - x.shape[2], x.shape[3])], 2)

            layer.k_store, layer.v_store = grow(layer.k_store), grow(layer.v_store)
            layer.keys = layer.k_store[:, :, : layer.length]
            layer.values = layer.v_store[:, :, : layer.length]
            layer.capacity = size

    def step(self, tok: Tensor, live: Tensor | None = None) -> Tensor:
        """(R,) tokens; rows where `live` is False leave a hole -> (R, V) next logits."""
        live = torch.ones_like(tok, dtype=torch.bool) if live is None else live
        self.reserve(1)
        self.mask[:, self.length] = live.to(self.mask.dtype)
        self.length += 1
        mask, pos = self.mask[:, : self.length], self.pos
        self.pos = self.pos + live.long()
        store = getattr(self.cache.layers[0], "k_store", None)
        if self.fast is not None and store is not None and store.shape[-2] >= self.length:
            return self.fast(tok, mask, pos, self.cache)
        self._sync()
        return self.call.forward(tok[:, None], mask, pos[:, None], self.cache, 1, True)[:, -1]

    def extend(self, ids: Tensor, live: Tensor) -> Tensor:
        """(R, S) left-padded tokens, `live` 0 on the padding -> (R, V) logits after each row's
        last token (rows with no token: garbage, the caller keeps their previous logits)."""
        s = ids.shape[1]
        self.reserve(s)
        self.mask[:, self.length : self.length + s] = live.to(self.mask.dtype)
        pos = self.pos[:, None] + (live.long().cumsum(1) - 1).clamp(min=0)  # (R, S)
        self.length += s
        self.pos = self.pos + live.long().sum(1)
        mask = self.mask[:, : self.length]
        self._sync()
        return self.call.forward(ids, mask, pos, self.cache, 1)[:, -1]  # observations: prompt-side

    def _sync(self) -> None:
        """Before a transformers forward: `FastStep` fills the preallocated storage and its
        length but leaves the layers' `keys`/`values` views (what the forward reads the cache
        length from) at their last update."""
        for layer in self.cache.layers:
            store = getattr(layer, "k_store", None)
            if store is not None and layer.keys.shape[-2] != layer.length:
                layer.keys = store[:, :, : layer.length]
                layer.values = layer.v_store[:, :, : layer.length]


class TurnDraw(Draw):
    """`sampler.Draw` for trajectories: the uniforms of every row's model tokens are drawn up
    front, (total, width) for the whole batch, and a row's j-th model token takes its j-th.
    One uniform per step (Draw's) would tie a row's later turns to how many steps the other
    rows' turns took, which differs between the whole batch and a rank's shard of it; this way
    a shard samples exactly what its rows get in the whole batch."""

    def __init__(
        self, n: int, generator: torch.Generator | None, greedy: bool, offset: int, total: int,
        width: int, device: torch.device,
    ) -> None:  # fmt: skip
        super().__init__(n, generator, greedy, offset, total)
        self.u: Tensor | None = None
        if not greedy:  # (total, width): the whole batch's, whatever the shard
            u = torch.rand(self.total, width, generator=generator, device=device)
            self.u = u[offset : offset + n]
        self.taken = torch.zeros(n, dtype=torch.long, device=device)  # model tokens per row

    def __call__(self, z: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.u is None:
            return super().__call__(z, rows)
        rows = torch.arange(self.n, device=z.device) if rows is None else rows
        j = self.taken[rows].clamp(max=self.u.shape[1] - 1)  # rows past their turn: unused
        return inverse_cdf(z, self.u[rows, j][:, None])

    def advance(self, rows: Tensor, fed: Tensor) -> None:
        """Rows `rows` whose token was real (`fed`) move on to their next uniform."""
        self.taken[rows] += fed.long()


class Grid:
    """Per-slot records of every row (slot = cache column after the prompt), holes included;
    `compact` drops the holes."""

    def __init__(self, n: int, device: torch.device, pad: int) -> None:
        self.n, self.device, self.pad, self.width = n, device, pad, 0
        z = lambda dtype: torch.zeros(n, 0, dtype=dtype, device=device)  # noqa: E731
        self.tok, self.logp, self.reward = z(torch.long), z(torch.float32), z(torch.float32)
        self.real, self.model = z(torch.bool), z(torch.bool)

    def _room(self, end: int) -> None:
        if end <= self.tok.shape[1]:
            return
        grow = end + end // 2 - self.tok.shape[1]
        more = lambda x: F.pad(x, (0, grow))  # noqa: E731
        self.tok, self.logp, self.reward = more(self.tok), more(self.logp), more(self.reward)
        self.real, self.model = more(self.real), more(self.model)

    def put(self, rows: Tensor, tok: Tensor, logp: Tensor, real: Tensor, model: bool) -> None:
        """Write (R, S) tokens of rows `rows` at the next S slots (every row advances)."""
        s = tok.shape[1]
        self._room(self.width + s)
        cols = slice(self.width, self.width + s)
        self.tok[rows, cols], self.logp[rows, cols] = tok, logp.float()
        self.real[rows, cols], self.model[rows, cols] = real, real & model
        self.width += s

    def compact(self) -> tuple[Tensor, ...]:
        """(N, T) tokens, real mask, model mask, log-probs and rewards without the holes."""
        real = self.real[:, : self.width]
        order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)  # real slots first
        t = max(int(real.sum(1).max()), 1) if self.n else 1
        order = order[:, :t]
        take = lambda x: x[:, : self.width].gather(1, order)  # noqa: E731
        keep = take(real)
        tok = take(self.tok).masked_fill(~keep, self.pad)
        model = take(self.model) & keep
        logp = take(self.logp).masked_fill(~model, 0.0)
        return tok, keep.float(), model.float(), logp, take(self.reward).masked_fill(~keep, 0.0)


@torch.no_grad()
def sample_turns(
    model: Any, prompts: PromptBatch, group_size: int, params: SamplingParams,
    respond: Respond, limits: TurnLimits, generator: torch.Generator | None = None,
    greedy: bool = False, fast: bool = True, capacity: int | None = None,
) -> Rollout:  # fmt: skip
    """G trajectories per prompt: model turns of at most `params.max_new_tokens` tokens ending at
    an EOS token, each answered by `respond` until it says done, `limits.max_turns` turns are
    spent (truncated) or the next model token would not fit in `limits.max_tokens` (truncated).
    A turn cut by its length is truncated without asking the environment. Draws are those of
    `TurnDraw` (one uniform per model token of a row, shard-aware). `capacity`: cache slots after
    the prompt allocated up front (default max_tokens + max_new_tokens); more are added as
    holes make trajectories' slots outgrow them."""
    check_params(params)
    g, n = group_size, len(prompts) * group_size
    slots = capacity or limits.max_tokens + params.max_new_tokens
    dec = TurnDecoder(model, params, slots, fast, positions=limits.max_tokens + 1)
    logits = dec.start(prompts.input_ids, prompts.attention_mask, g)  # (N, V)
    device = logits.device
    grid = Grid(n, device, params.pad_token_id)
    eos = torch.tensor(params.eos_token_ids, dtype=torch.long, device=device)
    first, total = prompts.extras.get("shard", (0, len(prompts)))
    draw = TurnDraw(n, generator, greedy, first * g, total * g, limits.max_tokens, device)
    rows = torch.arange(n, device=device)  # rollout row of each running row
    used = [0] * n  # trajectory tokens so far
    turns, reason = [0] * n, [TRUNCATION["none"]] * n
    for turn in range(limits.max_turns):
        caps = [min(params.max_new_tokens, limits.max_tokens - used[r]) for r in rows.tolist()]
        start = grid.width
        logits, count, ended_eos, last = _model_turn(
            dec, grid, params, logits, rows, caps, draw, eos
        )
        ended = (count, ended_eos, last)
        go, obs = _environment_turn(
            turn, start, rows.tolist(), grid, ended, used, respond, limits, reason
        )
        for r in rows.tolist():
            turns[r] += 1
        if not go:
            break
        keep = torch.tensor(go, dtype=torch.long, device=device)
        if len(go) < rows.shape[0]:  # finished trajectories leave the batch
            dec.select(keep)
            rows, logits = rows[keep], logits[keep]
        logits = _observe(dec, grid, rows, logits, obs, params.pad_token_id)
    tok, real, model_mask, logp, reward = grid.compact()
    index = torch.arange(len(prompts), device=device).repeat_interleave(g)
    code = torch.tensor(reason, dtype=torch.long, device=device)
    return Rollout(
        prompts=prompts,
        group_size=g,
        completion_ids=tok,
        completion_mask=real,
        sampling_logp=logp,
        truncated=code != TRUNCATION["none"],
        prompt_index=index,
        group_ids=index.clone(),
        data={
            "model_mask": model_mask,
            "turn_reward": reward,
            "turns": torch.tensor(turns, dtype=torch.long, device=device),
            "truncation": code,
        },
    )


def _model_turn(
    dec: TurnDecoder,
    grid: Grid,
    params: SamplingParams,
    logits: Tensor,
    rows: Tensor,
    caps: list[int],
    draw: TurnDraw,
    eos: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One model turn of the R running rows -> (R, V) logits after each row's last token, (R,)
    tokens written, (R,) ended by EOS, (R,) grid slot of the last token."""
    k, n = rows.shape[0], draw.n
    cap = torch.tensor(caps, device=logits.device)
    in_turn = torch.ones(k, dtype=torch.bool, device=logits.device)
    count = torch.zeros(k, dtype=torch.long, device=logits.device)
    ended_eos = torch.zeros_like(in_turn)
    last = torch.zeros_like(count)
    dec.reserve(max(caps))
    while True:
        z = transform_logits(logits, params, None, not draw.greedy)
        tok, lp = draw(z, None if k == n else rows)
        fed = in_turn  # the token is real for rows still in their turn
        draw.advance(rows, fed)
        last = torch.where(fed, grid.width, last)
        grid.put(rows, tok[:, None], lp[:, None], fed[:, None], model=True)
        count = count + fed.long()
        is_eos = torch.isin(tok, eos)
        ended_eos = ended_eos | (fed & is_eos)
        in_turn = fed & ~is_eos & (count < cap)
        # the turn's last token enters the cache too: the observation attends to it
        logits = torch.where(fed[:, None], dec.step(tok, fed), logits)
        if not bool(in_turn.any()):
            return logits, count, ended_eos, last


def _environment_turn(
    turn: int,
    start: int,
    rows: list[int],
    grid: Grid,
    ended: tuple[Tensor, Tensor, Tensor],
    used: list[int],
    respond: Respond,
    limits: TurnLimits,
    reason: list[int],
) -> tuple[list[int], list[list[int]]]:
    """Ask the environment about every turn that ended at EOS; record rewards, token use and
    truncation -> (positions in `rows` that go on, their observation tokens)."""
    count_l, eos_l, last_l = (x.tolist() for x in ended)
    asked = [i for i, e in enumerate(eos_l) if e]
    at = torch.tensor([rows[i] for i in asked], dtype=torch.long, device=grid.device)
    toks, mine = grid.tok[at, start : grid.width].cpu(), grid.model[at, start : grid.width].cpu()
    said = [t[m].tolist() for t, m in zip(toks, mine)]  # the model's tokens of this turn
    replies = respond(turn, [rows[i] for i in asked], said) if asked else []
    if len(replies) != len(asked):
        raise ValueError(f"the environment answered {len(replies)} of {len(asked)} turns")
    reply_of = dict(zip(asked, replies))
    go, obs = [], []
    for i, r in enumerate(rows):
        used[r] += count_l[i]
        reply = reply_of.get(i)
        if reply is not None:
            grid.reward[r, last_l[i]] += float(reply.reward)
        code = turn_outcome(reply, turn, used[r], limits)
        if code is not None:
            reason[r] = code
            continue
        tokens = list(reply.tokens) if reply is not None else []
        used[r] += len(tokens)
        go.append(i)
        obs.append(tokens)
    return go, obs


def _observe(
    dec: TurnDecoder, grid: Grid, rows: Tensor, logits: Tensor, obs: list[list[int]], pad: int
) -> Tensor:
    """Feed each running row its observation (left-padded, one forward) -> next logits."""
    width = max(len(o) for o in obs)
    if width == 0:  # every observation empty: the model goes on after its own last token
        return logits
    device = logits.device
    ids = torch.tensor([[pad] * (width - len(o)) + o for o in obs], device=device)  # (R, S)
    live = torch.tensor([[False] * (width - len(o)) + [True] * len(o) for o in obs], device=device)
    grid.put(rows, ids, torch.zeros(ids.shape, device=device), live, model=False)
    out = dec.extend(ids, live)
    has = live[:, -1:]
    return torch.where(has, out, logits)
