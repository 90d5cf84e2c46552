"""The `[environment]` section: multi-turn rollouts from a config, no Python glue.

    [environment]
    name = "tools"                      # a registered environment, or "module:attr"
    tools = ["my_tools:calculator"]     # Python functions the model may call (name = "tools")
    max_turns = 3
    max_tokens = 256
    tool_timeout_s = 5.0
    kwargs = {parser = "hermes"}        # more keyword arguments of the environment

With a name set, `grpo-ar train` wraps the text adapter in `MultiTurnAdapter` with this
environment (grpo_ar/train/env_registry.py builds it). Everything is checked here, when the
config is read: the names resolve, the environment is built once with its arguments, and each
failure is a ConfigError naming the key. Importing a module runs its code: a config is trusted
like code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, need
from ..train.environments import CREDIT


@dataclass(frozen=True)
class EnvironmentConfig:
    """Which environment answers the model's turns (empty name: single-turn rollouts)."""

    name: str = ""
    """A registered environment (`tools`), or "module:attr" naming an Environment subclass or a
    function returning one; called with max_turns, max_tokens, credit and `kwargs` (and tools,
    timeout_s when `tools` is given). Empty: single-turn rollouts."""
    path: str = ""
    """Folder put first on sys.path to import "module:attr" strings from (e.g. "." for the
    working directory, "examples/tool_calculator"); relative to the working directory."""
    max_turns: int = 4
    """Model turns per trajectory; one still unfinished after them is truncated."""
    max_tokens: int = 512
    """Trajectory tokens after the first prompt, the model's and the environment's together."""
    credit: str = "final"
    """final: the trajectory's rewards give every model token one advantage; per_turn: each
    turn's tokens add the group-normalised per-turn rewards still to come."""
    tools: tuple[str, ...] = ()
    """"module:function" import strings of the tools the model may call (type hints and an Args:
    docstring give their schemas)."""
    tool_timeout_s: float = 5.0
    """Seconds a tool call may run before the model reads a timeout error."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """More keyword arguments of the environment (tools: parser, max_result_chars,
    result_role)."""

    def __post_init__(self) -> None:
        need(self.max_turns >= 1, f"environment.max_turns={self.max_turns}: need >= 1")
        need(self.max_tokens >= 1, f"environment.max_tokens={self.max_tokens}: need >= 1")
        need(
            self.credit in CREDIT,
            f"environment.credit={self.credit!r}: use {' or '.join(CREDIT)}",
        )
        need(
            math.isfinite(self.tool_timeout_s) and self.tool_timeout_s > 0,
            f"environment.tool_timeout_s={self.tool_timeout_s}: need a finite number > 0",
        )
        if not self.name:
            unused = [k for k in ("tools", "kwargs", "path") if getattr(self, k)]
            if unused:
                raise ConfigError(
                    f"environment.{unused[0]} is set but environment.name is empty: name the "
                    'environment (e.g. name = "tools") or remove the key'
                )
            return
        self.build()  # every name resolved and the arguments accepted, before anything loads

    @property
    def enabled(self) -> bool:
        return bool(self.name)

    def build(self) -> Any:
        """The configured Environment (grpo_ar/train/env_registry.py)."""
        from ..train.env_registry import build_environment

        return build_environment(self)
