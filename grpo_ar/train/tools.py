"""Tool calling on top of `Environment`: Python functions as tools, their JSON schemas for the chat
template (`apply_chat_template(tools=...)`), calls parsed from the model's turn, run with a
timeout; the results (or what went wrong) come back as `tool` messages.

Nothing the model writes and nothing a tool does crashes a rollout: a malformed call, an unknown
tool, bad arguments, a tool that raises and a tool that runs past its timeout each become an
observation the model reads, and count as failed calls (`tools/failure_frequency`).

Timeouts run each call in a daemon thread and stop waiting after `timeout_s`: the trajectory goes
on, but Python cannot kill a thread, so a hung call keeps its thread until it returns (a daemon
thread does not keep the process alive). Tools that may hang for good belong in a subprocess of
their own, inside the tool function.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..core.registry import Registry
from ..types import Entry
from .environments import Environment, Observation


@dataclass(frozen=True)
class Tool:
    """A Python function the model may call, with the JSON schema the chat template shows."""

    fn: Callable[..., Any]
    schema: dict[str, Any]
    timeout_s: float | None = None  # None: the environment's

    @property
    def name(self) -> str:
        return self.schema["function"]["name"]


def as_tool(fn: Callable[..., Any] | Tool, timeout_s: float | None = None) -> Tool:
    """A function with type hints and a Google-style docstring (`Args:`) -> a Tool; its schema
    is transformers' `get_json_schema`, the one `apply_chat_template(tools=[fn])` renders."""
    if isinstance(fn, Tool):
        return fn
    from transformers.utils import get_json_schema

    try:
        schema = get_json_schema(fn)
    except Exception as e:  # transformers raises its own error types for missing docs / hints
        raise ValueError(
            f"tool {getattr(fn, '__name__', fn)!r}: {e}; give it type hints and a docstring "
            "with an Args: section describing every argument"
        ) from None
    return Tool(fn, schema, timeout_s)


@dataclass(frozen=True)
class ToolCall:
    """One parsed call; `error` set when the model's call could not be read."""

    name: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


PARSERS = Registry("tool-call parser")

HERMES_PROMPT = (
    "You may call one or more functions to assist with the user query.\n\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor "
    "each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)
_HERMES = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)


@PARSERS.register("hermes")
def parse_hermes(text: str) -> list[ToolCall]:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks (Hermes, Qwen2.5/3,
    SmolLM3 and most chat templates' tool format) -> calls, in order."""
    calls = []
    for body, close in _HERMES.findall(text):
        if not close:
            calls.append(ToolCall(error="a <tool_call> without </tool_call>"))
            continue
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append(ToolCall(error=f"the tool call is not valid JSON ({e.msg})"))
            continue
        args = obj.get("arguments", {}) if isinstance(obj, dict) else None
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append(ToolCall(error='a tool call needs {"name": ..., "arguments": {...}}'))
        elif not isinstance(args, dict):
            calls.append(ToolCall(obj["name"], error="the arguments must be a JSON object"))
        else:
            calls.append(ToolCall(obj["name"], args))
    return calls


@dataclass
class ToolState:
    """One trajectory's episode: its entry and its tool use so far."""

    entry: Entry
    calls: int = 0
    failures: int = 0
    log: list[tuple[str, str]] = field(default_factory=list)  # (call, result) in order


class _Running:
    """A call running in a daemon thread, with its deadline."""

    def __init__(self, fn: Callable[..., Any], args: dict[str, Any], timeout_s: float) -> None:
        self.box: dict[str, Any] = {}
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s

        def run() -> None:
            try:
                self.box["value"] = fn(**args)
            except BaseException as e:  # the model reads any failure, even a SystemExit
                self.box["error"] = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self) -> tuple[bool, str]:
        """(succeeded, what the model reads), waiting at most until the deadline."""
        self.thread.join(max(0.0, self.deadline - time.monotonic()))
        if self.thread.is_alive():
            return False, f"error: timed out after {self.timeout_s:g} s"
        if "error" in self.box:
            e = self.box["error"]
            return False, f"error: {type(e).__name__}: {e}"
        return True, str(self.box.get("value"))


class ToolEnvironment(Environment):
    """The model calls `tools` until a turn without a call (its answer, `done`). Each call's
    result comes back as a `result_role` message; results are cut at `max_result_chars`. All
    calls of a turn, over every trajectory, run concurrently."""

    def __init__(
        self,
        tools: Sequence[Callable[..., Any] | Tool],
        *,
        max_turns: int = 4,
        max_tokens: int = 512,
        credit: str = "final",
        timeout_s: float = 5.0,
        parser: str = "hermes",
        max_result_chars: int = 500,
        result_role: str = "tool",
    ) -> None:
        super().__init__(max_turns=max_turns, max_tokens=max_tokens, credit=credit)
        self.tool_list = [as_tool(t) for t in tools]
        self.by_name = {t.name: t for t in self.tool_list}
        if len(self.by_name) != len(self.tool_list):
            raise ValueError(f"two tools share a name: {[t.name for t in self.tool_list]}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.parse = PARSERS[parser]
        self.parser, self.timeout_s = parser, timeout_s
        self.max_result_chars, self.result_role = max_result_chars, result_role

    def tools(self) -> list[dict[str, Any]]:
        return [t.schema for t in self.tool_list]

    def tool_prompt(self) -> str | None:
        if self.parser != "hermes":
            return None
        return HERMES_PROMPT.format(tools="\n".join(json.dumps(s) for s in self.tools()))

    def reset(self, entry: Entry) -> ToolState:
        return ToolState(entry)

    def step(self, state: Any, text: str, tokens: Sequence[int]) -> Observation:
        return self.step_batch([state], [text], [tokens])[0]

    def step_batch(
        self, states: Sequence[Any], texts: Sequence[str], tokens: Sequence[Sequence[int]]
    ) -> list[Observation]:
        plans = [[self._start(c) for c in self.parse(text)] for text in texts]
        out = []
        for state, plan in zip(states, plans):
            if not plan:  # no call: the turn is the model's answer
                out.append(Observation(done=True))
                continue
            messages = []
            for call, running in plan:
                ok, result = running.result() if isinstance(running, _Running) else running
                result = result[: self.max_result_chars]
                state.calls += 1
                state.failures += not ok
                state.log.append((call, result))
                messages.append({"role": self.result_role, "content": result})
            out.append(Observation(messages=tuple(messages)))
        return out

    def _start(self, call: ToolCall) -> tuple[str, _Running | tuple[bool, str]]:
        """(the call as text, a running call or an immediate failure)."""
        shown = f"{call.name}({json.dumps(call.arguments)})" if call.name else "?"
        if call.error is not None:
            return shown, (False, f"error: {call.error}")
        tool = self.by_name.get(call.name)
        if tool is None:
            names = ", ".join(self.by_name)
            return shown, (False, f"error: no tool named {call.name!r}; tools: {names}")
        params = tool.schema["function"].get("parameters", {})
        missing = [a for a in params.get("required", ()) if a not in call.arguments]
        unknown = [a for a in call.arguments if a not in params.get("properties", {})]
        if missing or unknown:
            what = f"missing {missing}" if missing else f"unknown {unknown}"
            return shown, (False, f"error: {call.name}: {what} arguments")
        timeout = tool.timeout_s if tool.timeout_s is not None else self.timeout_s
        return shown, _Running(tool.fn, call.arguments, timeout)

    def stats(self, state: Any) -> dict[str, float]:
        return {"tool_calls": float(state.calls), "tool_failures": float(state.failures)}
