"""Name -> function registries; every core variant is looked up by its paper's name.

A registry is typed by the `Protocol` of its one signature (e.g. `Registry[LossFn]`), so a type
checker refuses an entry whose positional tensors do not fit. Facts about an entry that callers
need besides calling it (a loss's ratio level) are declared when it is registered, next to the
function, instead of in name lists elsewhere.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from typing_extensions import TypeVar  # a default (PEP 696): `Registry(...)` alone is untyped

F = TypeVar("F", default=Callable[..., Any])


class UnknownNameError(KeyError, ValueError):
    """An unknown registry key; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class Registry(Mapping[str, F]):
    """A read-mostly mapping of names to functions with one shared signature `F`."""

    def __init__(
        self, kind: str, inputs: tuple[str, ...] = (), info: Mapping[str, Any] | None = None
    ) -> None:
        self.kind = kind
        # keyword-only tensors the caller supplies (e.g. `lengths`); not user options
        self.inputs = frozenset(inputs)
        # the facts each entry may declare at registration, with the value of one that does not
        self.info_defaults: dict[str, Any] = dict(info or {})
        self._fns: dict[str, F] = {}
        self._info: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **info: Any) -> Callable[[F], F]:
        """Decorator: add `fn` under `name`, with the facts `info` (keys of `info_defaults`)."""
        unknown = sorted(set(info) - set(self.info_defaults))
        if unknown:
            raise TypeError(
                f"{self.kind} {name!r}: unknown registration field {', '.join(map(repr, unknown))}; "
                f"this registry declares: {', '.join(sorted(self.info_defaults)) or '(none)'}"
            )

        def deco(fn: F) -> F:
            if name in self._fns:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._fns[name] = fn
            self._info[name] = {**self.info_defaults, **info}
            return fn

        return deco

    def __getitem__(self, name: str) -> F:
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

    def info(self, name: str) -> dict[str, Any]:
        """The facts entry `name` declared when registered (defaults filled in)."""
        self[name]  # the unknown-name error, with the valid names
        return dict(self._info[name])

    def options(self, name: str) -> dict[str, Any]:
        """Keyword-only hyper-parameters of entry `name` with their defaults (inputs excluded)."""
        fn = self[name]
        assert callable(fn), f"{self.kind} {name!r} is not callable"
        sig = inspect.signature(fn)
        return {
            p.name: p.default
            for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in self.inputs
        }

    def takes(self, name: str) -> frozenset[str]:
        """The caller-supplied inputs (of `self.inputs`) that entry `name` accepts."""
        fn = self[name]
        assert callable(fn), f"{self.kind} {name!r} is not callable"
        params = inspect.signature(fn).parameters
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
