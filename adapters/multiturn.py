"""Multi-turn text adapter: a `TextAdapter`'s tokenizer and chat template, trajectories with an
`Environment` (grpo_ar/train/environments.py) sampled by grpo_ar/generation/multiturn.py.

The trainer needs no change: `sample` returns a rollout whose environment tokens are outside
`Rollout.model_mask` (the trainer's loss mask), and `token_logprobs` is 0 there, so those tokens
reach neither the loss, the KL, the entropy nor the gradient even under filters that exclude
them. A rollout backend other than the built-in sampler plugs in through `trajectories`
(`generation.multiturn.Trajectories`): it passes its own turn loop, which takes the same
`respond` callback and returns the same rollout fields (the vLLM backend's is
`generation.vllm_turns.engine_turns`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from grpo_ar.generation.multiturn import (
    Reply,
    Respond,
    TurnLimits,
    TurnSampler,
    check_params,
    sample_turns,
)
from grpo_ar.train.environments import Environment, Observation, stats_tensors
from grpo_ar.types import Entry, PromptBatch, Rollout

from .base import Adapter
from .text import TextAdapter


class Trajectory(str):
    """The model's last turn (what rewards read, special tokens stripped), with the trajectory:
    `turns` (every model turn's text), `transcript` (every token after the prompt, special
    tokens kept), `env_reward` (sum of per-turn rewards) and `stats` (Environment.stats)."""

    turns: tuple[str, ...]
    transcript: str
    env_reward: float
    stats: Mapping[str, float]

    def __new__(
        cls,
        turns: Sequence[str],
        transcript: str,
        env_reward: float,
        stats: Mapping[str, float],
    ) -> Trajectory:
        obj = super().__new__(cls, turns[-1] if turns else "")
        obj.turns, obj.transcript = tuple(turns), transcript
        obj.env_reward, obj.stats = env_reward, dict(stats)
        return obj

    def __getnewargs__(self) -> tuple[Any, ...]:  # type: ignore[override]
        # pickling (outputs gathered over data-parallel ranks) rebuilds it through __new__
        return (self.turns, self.transcript, self.env_reward, self.stats)


class ChatRenderer:
    """First prompts and observations as the tokenizer's chat template writes them."""

    def __init__(self, text: TextAdapter, tools: list[dict] | None, tool_prompt: str | None):
        self.text, self.tok = text, text.tokenizer
        self.tools, self.tool_prompt = tools, tool_prompt

    def _render(self, messages: list, generation: bool, tools: list | None) -> str:
        text = self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation, tools=tools or None
        )
        return str(text)

    def prompt(self, prompt: Any) -> tuple[str, bool]:
        """(text, whether the chat template wrote it) of a first prompt, tools included."""
        if not self.tools:
            templated = isinstance(prompt, list) or bool(self.text.chat_template)
            return self.text.prompt_text(prompt), templated
        if getattr(self.tok, "chat_template", None) is None or self.text.chat_template is False:
            raise ValueError("tools need a tokenizer with a chat template; set chat_template")
        messages = (
            list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        )
        system = self.text.system_prompt
        if system and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": system}, *messages]
        with_tools = self._render(messages, True, self.tools)
        if with_tools != self._render(messages, True, None) or not self.tool_prompt:
            return with_tools, True
        # the template ignores `tools=`: describe them in the system message instead
        if messages[0].get("role") == "system":
            head = {"role": "system", "content": f"{messages[0]['content']}\n\n{self.tool_prompt}"}
            messages = [head, *messages[1:]]
        else:
            messages = [{"role": "system", "content": self.tool_prompt}, *messages]
        return self._render(messages, True, None), True

    def between(self, messages: Sequence[Mapping[str, Any]], end: str) -> str:
        """The text the chat template puts after an assistant turn ending in `end` (the model's
        last token, e.g. <|im_end|>), around `messages`, up to the next assistant turn."""
        base = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
        before = self._render(base, False, self.tools)
        after = self._render([*base, *messages], True, self.tools)
        cut = before.rfind(end)
        if not end or cut < 0 or after[: cut + len(end)] != before[: cut + len(end)]:
            raise ValueError(
                f"the chat template does not end an assistant turn with {end!r} the same way "
                "once other messages follow; give the observation as text or tokens"
            )
        return after[cut + len(end) :]


class MultiTurnAdapter(Adapter):
    """Text prompts, trajectories with `env`, outputs `Trajectory` strings (the last turn)."""

    def __init__(self, text: TextAdapter, env: Environment, fast: bool = True) -> None:
        check_params(text.sampling)
        super().__init__(text.sampling)
        self.text, self.env, self.fast = text, env, fast
        self.tokenizer = text.tokenizer
        self.renderer = ChatRenderer(text, env.tools(), env.tool_prompt())

    def encode(self, entries: Sequence[Entry]) -> PromptBatch:
        rows = []
        for e in entries:
            text, templated = self.renderer.prompt(self.env.prompt(e))
            # a chat template writes its own BOS; plain prompts get the tokenizer's
            rows.append(self.tokenizer(text, add_special_tokens=not templated)["input_ids"])
        limit = self.text.max_prompt_tokens
        if limit is not None and max(map(len, rows)) > limit:
            raise ValueError(
                f"a first prompt has {max(map(len, rows))} tokens > max_prompt_tokens={limit}; "
                "raise the limit or shorten it"
            )
        width, pad = max(map(len, rows)), self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return PromptBatch(ids, mask, list(entries))

    def sample(
        self, model: Any, prompts: PromptBatch, group_size: int,
        generator: torch.Generator | None = None, greedy: bool = False,
    ) -> Rollout:  # fmt: skip
        """G trajectories per prompt, sampled by the built-in KV-cached sampler."""

        def turns(respond: Respond, limits: TurnLimits) -> Rollout:
            return sample_turns(
                model, prompts, group_size, self.sampling, respond, limits,
                generator=generator, greedy=greedy, fast=self.fast,
            )  # fmt: skip

        return self.trajectories(prompts, group_size, turns)

    def trajectories(self, prompts: PromptBatch, group_size: int, turns: TurnSampler) -> Rollout:
        """G trajectories per prompt drawn by `turns` (a sampler's turn loop), one episode of
        the environment each; `data["env/<stat>"]` from `Environment.stats`."""
        n = len(prompts) * group_size
        states = [self.env.reset(prompts.entries[i // group_size]) for i in range(n)]

        def respond(turn: int, rows: list[int], said: list[list[int]]) -> list[Reply]:
            texts = self.tokenizer.batch_decode(said, skip_special_tokens=True)
            obs = self.env.step_batch([states[r] for r in rows], texts, said)
            return [self.reply(o, s[-1]) for o, s in zip(obs, said)]

        rollout = turns(respond, self.env.limits)
        device = rollout.completion_ids.device
        rollout.data.update(stats_tensors([self.env.stats(s) for s in states], device))
        rollout.extras["credit"] = self.env.credit
        return rollout

    def reply(self, obs: Observation, last_token: int) -> Reply:
        """An Observation in tokens: messages rendered after the model's last token."""
        if obs.done:
            return Reply((), obs.reward, True)
        if obs.tokens is not None:
            tokens = list(obs.tokens)
        else:
            text = obs.text or ""
            if obs.messages:
                end = str(self.tokenizer.decode([last_token], skip_special_tokens=False))
                text = self.renderer.between(obs.messages, end)
            tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        return Reply(tokens, obs.reward, False)

    def token_logprobs(
        self, model: Any, rollout: Rollout, with_entropy: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """The base scoring, exactly 0 on the environment's tokens (a filter may exclude them:
        -inf there would turn a masked term into NaN)."""
        logp, ent = super().token_logprobs(model, rollout, with_entropy)
        own = rollout.model_mask.bool()
        logp = torch.where(own, logp, torch.zeros_like(logp))
        return logp, None if ent is None else torch.where(own, ent, torch.zeros_like(ent))

    def output_lengths(self, rollout: Rollout) -> list[int]:
        """Tokens the model wrote (environment tokens excluded)."""
        return rollout.model_mask.sum(-1).long().tolist()

    def decode(self, rollout: Rollout) -> list[Trajectory]:
        ids, own = rollout.completion_ids.tolist(), rollout.model_mask.bool().tolist()
        lengths = rollout.lengths.tolist()
        rewards = rollout.data["turn_reward"].sum(-1).tolist()
        stats = {k[4:]: v.tolist() for k, v in rollout.data.items() if k.startswith("env/")}
        eos = set(self.sampling.eos_token_ids)
        out = []
        for i, (row, mine, n) in enumerate(zip(ids, own, lengths)):
            runs: list[list[int]] = []
            for j in range(n):
                if mine[j] and (not runs or not mine[j - 1] or row[j - 1] in eos):
                    runs.append([])
                if mine[j]:
                    runs[-1].append(row[j])
            turns = self.tokenizer.batch_decode(runs, skip_special_tokens=True) if runs else []
            transcript = str(self.tokenizer.decode(row[:n], skip_special_tokens=False))
            out.append(
                Trajectory(turns, transcript, rewards[i], {k: v[i] for k, v in stats.items()})
            )
        return out


def multiturn_adapter(
    tokenizer: Any, sampling: Any, env: Environment, **text_kw: Any
) -> MultiTurnAdapter:
    """A MultiTurnAdapter over a fresh TextAdapter (`text_kw`: chat_template, system_prompt,
    max_prompt_tokens)."""
    return MultiTurnAdapter(TextAdapter(tokenizer, sampling, **text_kw), env)
