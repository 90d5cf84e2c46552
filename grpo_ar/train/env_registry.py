"""Environments by name, and the `[environment]` config section turned into one.

`ENVIRONMENTS` holds the built-in ones (`tools`: `ToolEnvironment` over Python functions);
"module:attr" names anything importable that returns an `Environment` (a subclass, or a
function). `build_environment` resolves every name of a section and builds the environment,
each failure a ConfigError naming the key (grpo_ar/config/environment.py calls it when the
config is read, before a model loads).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..core.registry import Registry
from ..errors import ConfigError
from .environments import Environment
from .tools import ToolEnvironment, as_tool


class EnvironmentFactory(Protocol):
    """A registered environment's builder, called with the section's values."""

    def __call__(
        self,
        *,
        max_turns: int,  # environment.max_turns
        max_tokens: int,  # environment.max_tokens
        credit: str,  # environment.credit
        tools: list[Callable[..., Any]],  # environment.tools, imported
        timeout_s: float,  # environment.tool_timeout_s
        **kwargs: Any,  # environment.kwargs
    ) -> Environment: ...


ENVIRONMENTS: Registry[EnvironmentFactory] = Registry("environment")
# the section's own keys: a kwargs entry may not set them a second way
OWN_KEYS = ("max_turns", "max_tokens", "credit", "tools", "timeout_s")


@ENVIRONMENTS.register("tools")
def tools_environment(
    *,
    max_turns: int,
    max_tokens: int,
    credit: str,
    tools: list[Callable[..., Any]],
    timeout_s: float,
    **kwargs: Any,
) -> Environment:
    """`ToolEnvironment`: the model calls `tools` until a turn without a call (its answer)."""
    if not tools:
        raise ConfigError(
            'environment.tools is empty: the "tools" environment needs at least one '
            '"module:function", e.g. tools = ["my_tools:calculator"]'
        )
    return ToolEnvironment(
        tools, max_turns=max_turns, max_tokens=max_tokens, credit=credit, timeout_s=timeout_s,
        **kwargs,
    )  # fmt: skip


def import_attr(spec: str, key: str, path: str = "") -> Any:
    """The object a "module:attr" string names (`key`: the config key, for messages); `path`
    (environment.path) is put first on sys.path. Runs the module's code."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ConfigError(f"{key}={spec!r}: give \"module:attr\", e.g. 'my_tools:calculator'")
    if path:
        folder = str(Path(path).resolve())
        if not Path(folder).is_dir():
            raise ConfigError(
                f"environment.path={path!r} is not a folder; give the one holding {module}"
            )
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        obj = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not module.startswith(e.name):
            raise  # the module itself imports something missing: the user's to fix
        raise ConfigError(
            f"{key}={spec!r}: no module {module!r}; install it, or set environment.path to the "
            'folder holding it (e.g. environment.path = "." for the working directory)'
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}={spec!r}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key}={spec!r} is a {type(obj).__name__}, not a class or function")
    return obj


def build_environment(section: Any) -> Environment:
    """The Environment of an `EnvironmentConfig` (`name` set): tools imported and their
    schemas read, the environment built with the section's values and `kwargs`."""
    taken = sorted(set(section.kwargs) & set(OWN_KEYS))
    if taken:
        key = "tool_timeout_s" if taken[0] == "timeout_s" else taken[0]
        raise ConfigError(f"environment.kwargs.{taken[0]}: set environment.{key} instead")
    tools = []
    for i, spec in enumerate(section.tools):
        fn = import_attr(spec, f"environment.tools[{i}]", section.path)
        try:
            tools.append(as_tool(fn))
        except ValueError as e:
            raise ConfigError(f"environment.tools[{i}]={spec!r}: {e}") from None
    kw: dict[str, Any] = dict(
        max_turns=section.max_turns, max_tokens=section.max_tokens, credit=section.credit
    )
    if section.name in ENVIRONMENTS:
        factory: Callable[..., Any] = ENVIRONMENTS[section.name]
        kw.update(tools=tools, timeout_s=section.tool_timeout_s)
    elif ":" in section.name:
        factory = import_attr(section.name, "environment.name", section.path)
        if tools:  # a custom tool environment takes them as ToolEnvironment does
            kw.update(tools=tools, timeout_s=section.tool_timeout_s)
    else:
        raise ConfigError(
            f"environment.name={section.name!r}: use a registered environment "
            f'({", ".join(sorted(ENVIRONMENTS))}) or "module:attr" naming an Environment'
        )
    try:
        env = factory(**kw, **section.kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"environment.name={section.name!r} refused its arguments ({', '.join(kw)}"
            f"{', ' if section.kwargs else ''}{', '.join(section.kwargs)}): {e}; "
            "fix environment.kwargs (or the section's keys)"
        ) from None
    if not isinstance(env, Environment):
        raise ConfigError(
            f"environment.name={section.name!r} built a {type(env).__name__}, not an "
            "Environment (grpo_ar.train.environments.Environment)"
        )
    return env
