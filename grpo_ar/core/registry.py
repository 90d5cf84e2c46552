"""Name -> function registries; every core variant is looked up by its paper's name."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class UnknownNameError(KeyError, ValueError):
    """An unknown registry key; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class Registry(Mapping[str, Callable[..., Any]]):
    """A read-mostly mapping of names to functions with one shared signature."""

    def __init__(self, kind: str, inputs: tuple[str, ...] = ()) -> None:
        self.kind = kind
        # keyword-only tensors the caller supplies (e.g. `lengths`); not user options
        self.inputs = frozenset(inputs)
        self._fns: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            if name in self._fns:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._fns[name] = fn
            return fn

        return deco

    def __getitem__(self, name: str) -> Callable[..., Any]:
        try:
            return self._fns[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(sorted(self._fns))}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._fns)

    def __len__(self) -> int:
        return len(self._fns)

    def options(self, name: str) -> dict[str, Any]:
        """Keyword-only hyper-parameters of entry `name` with their defaults (inputs excluded)."""
        sig = inspect.signature(self[name])
        return {
            p.name: p.default
            for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in self.inputs
        }

    def takes(self, name: str) -> frozenset[str]:
        """The caller-supplied inputs (of `self.inputs`) that entry `name` accepts."""
        params = inspect.signature(self[name]).parameters
        return frozenset(k for k in self.inputs if k in params)

    def check_options(self, name: str, given: Mapping[str, Any], where: str) -> None:
        """Raise one clear error when `given` holds a key entry `name` does not take."""
        valid = self.options(name)
        unknown = sorted(set(given) - set(valid))
        if unknown:
            raise ValueError(
                f"{where}: {self.kind} {name!r} takes no option {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(sorted(valid)) or '(none)'}"
            )
        for key, value in given.items():  # "0.2" for a number would fail deep inside the math
            default = valid[key]
            number = isinstance(default, (int, float)) and not isinstance(default, bool)
            if number and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise ValueError(
                    f"{where}.{key}={value!r}: {self.kind} {name!r} takes a number here "
                    f"(default {default}); write it without quotes"
                )


def same_definition(a: Any, b: Any) -> bool:
    """Whether `a` and `b` are one definition evaluated twice: a module both run and imported,
    a notebook cell run again. Same qualified name and same code (decorator wrappers unwrapped;
    for classes, the code of every method); a changed body or another function is different."""
    a, b = inspect.unwrap(a), inspect.unwrap(b)
    if a is b:
        return True
    if getattr(a, "__qualname__", None) != getattr(b, "__qualname__", None):
        return False
    if inspect.isclass(a) and inspect.isclass(b):
        code = lambda c: {k: v.__code__ for k, v in vars(c).items() if hasattr(v, "__code__")}  # noqa: E731
        return code(a) == code(b)
    if getattr(a, "__code__", None) is None or a.__code__ != getattr(b, "__code__", None):
        return False
    cells = lambda f: [c.cell_contents for c in f.__closure__ or ()]  # noqa: E731
    try:  # a factory's functions share code; their captured values tell them apart
        same_values = cells(a) == cells(b)
    except Exception:  # values without a usable ==
        same_values = False
    return same_values and (a.__defaults__, a.__kwdefaults__) == (b.__defaults__, b.__kwdefaults__)
