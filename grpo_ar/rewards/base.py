"""Reward registry, load-time spec validation, and the batch computer that never crashes a run.

A reward is `fn(outputs, args, ctx) -> Sequence[float | None]`: `outputs[i]` a decoded output,
`args[i]` this reward's resolved arguments for sample i, None/NaN = that sample failed.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..core.registry import Registry, same_definition
from ..errors import DataError
from ..types import Entry

logger = logging.getLogger("grpo_ar.rewards")

RewardFn = Callable[[list[Any], list[dict], "RewardContext"], "Sequence[float | None] | Tensor"]


@dataclass(frozen=True)
class RewardContext:
    """What a reward may know beyond the outputs; lists are aligned with `outputs`."""

    entries: list[Entry]  # entries[i] is the entry that produced outputs[i]
    group_ids: list[int]  # group of each output; groups contiguous, in order
    group_size: int
    step: int
    lengths: list[int] | None = None  # token count of each output when the trainer knows it

    def subset(self, idx: Sequence[int]) -> RewardContext:
        """The context of outputs `idx` (what one reward sees when only they use it)."""
        lengths = None if self.lengths is None else [self.lengths[i] for i in idx]
        entries, group_ids = [self.entries[i] for i in idx], [self.group_ids[i] for i in idx]
        return RewardContext(entries, group_ids, self.group_size, self.step, lengths)


class RewardSpecError(DataError):
    """A dataset entry asks for a reward wrongly; the message names entry, reward and argument."""


class UnknownRewardError(RewardSpecError):
    """An entry names a reward nobody registered; the message lists the valid names."""


@dataclass(frozen=True)
class RewardDef:
    """A registered reward: the function (or class making one) and the arguments it takes."""

    name: str
    obj: Callable[..., Any]
    required: tuple[str, ...] = ()
    defaults: Mapping[str, Any] | None = None  # optional args; None = accepts any argument
    check: Callable[[Mapping[str, Any]], None] | None = None  # raises ValueError on bad args
    setup_defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_class(self) -> bool:
        return inspect.isclass(self.obj)

    def check_args(self, args: Mapping[str, Any], where: str, partial: bool = False) -> None:
        """Raise RewardSpecError for a missing, unknown or (per `check`) invalid argument.

        `partial`: config-level defaults, to be completed per entry; only unknown names are errors.
        """
        head = f"{where}: reward {self.name!r}"
        for arg in () if partial else self.required:
            if arg not in args:
                fix = f"add it to the entry's args for {self.name!r} or set it in the reward setup"
                raise RewardSpecError(f"{head} needs argument {arg!r}; {fix}")
        valid = set(self.required) | set(self.defaults or ())
        unknown = ", ".join(map(repr, sorted(set(args) - valid)))
        if self.defaults is not None and unknown:
            msg = f"{head} takes no argument {unknown}; valid arguments: {', '.join(sorted(valid))}"
            raise RewardSpecError(msg)
        if self.check is not None and not partial:
            try:
                self.check(args)
            except (ValueError, TypeError) as e:
                raise RewardSpecError(f"{head}: {e}") from None


class RewardRegistry(Registry[RewardDef]):
    """Name -> RewardDef. Functions are used as they are; classes are instantiated once per run."""

    def __init__(self) -> None:
        super().__init__("reward")

    def register(  # type: ignore[override]
        self,
        name: str,
        required: Sequence[str] = (),
        *,
        defaults: Mapping[str, Any] | None = None,
        check: Callable[[Mapping[str, Any]], None] | None = None,
        setup_defaults: Mapping[str, Any] | None = None,
    ) -> Callable[[Any], Any]:
        """Decorator. `per_sample` functions contribute their own required args and defaults.
        Registering the same definition again under its name (a module both run and imported,
        a notebook cell run twice) replaces it; another function under a taken name is refused."""

        def deco(obj: Any) -> Any:
            req, opts = tuple(required), defaults
            if hasattr(obj, "__reward_required__"):
                req = tuple(dict.fromkeys((*req, *obj.__reward_required__)))
                opts = obj.__reward_defaults__ if opts is None else opts
            rdef = RewardDef(name, obj, req, opts, check, dict(setup_defaults or {}))
            old = self._fns.get(name)
            if old is not None and same_reward(old, rdef):
                self._fns[name] = rdef
                return obj
            super(RewardRegistry, self).register(name)(rdef)
            return obj

        return deco

    register_reward = register

    def options(self, name: str) -> dict[str, Any]:
        """Optional per-entry arguments of reward `name` with their defaults."""
        return dict(self[name].defaults or {})


def same_reward(a: RewardDef, b: RewardDef) -> bool:
    """One reward definition evaluated twice: same function or class (per_sample unwrapped),
    same arguments and checks."""
    fn = lambda d: getattr(d.obj, "per_sample", d.obj)  # noqa: E731
    parts = lambda d: (d.required, d.defaults, d.setup_defaults)  # noqa: E731
    checks = a.check is b.check or (
        a.check is not None and b.check is not None and same_definition(a.check, b.check)
    )
    return same_definition(fn(a), fn(b)) and parts(a) == parts(b) and checks


REWARDS = RewardRegistry()
register_reward = REWARDS.register_reward


def per_sample(fn: Callable[..., float | None]) -> RewardFn:
    """Lift `fn(output, *, arg, opt=default) -> float | None` to the batch signature.

    Keyword-only parameters without a default are required per-entry args, the others optional
    (`**kwargs` accepts any). A sample whose call raises scores None; the first error is logged.
    """
    rest = reward_keywords(fn, "per_sample", "output")
    logged: list[Exception] = []

    def batch(outputs: list[Any], args: list[dict], ctx: RewardContext) -> list[float | None]:
        out: list[float | None] = []
        for o, a in zip(outputs, args):
            try:
                out.append(fn(o, **a))
            except Exception as e:  # one odd output must not sink its batch-mates
                batch.last_error = f"{type(e).__name__}: {e}"  # type: ignore[attr-defined]
                if not logged:
                    logged.append(e)
                    msg = "reward %s failed on a sample (logged once): %s"
                    logger.warning(msg, fn.__name__, _summary(e))
                out.append(None)
        return out

    batch.per_sample = fn  # type: ignore[attr-defined]
    return lifted_from(batch, fn, rest)


def reward_keywords(fn: Callable[..., Any], decorator: str, first: str) -> list[inspect.Parameter]:
    """The parameters of `fn` after its first (its keyword-only per-entry args and any
    **kwargs); TypeError, naming `decorator`, unless `fn` takes (`first`, *, arg, ...)."""
    head, *rest = inspect.signature(fn).parameters.values()
    if head.kind not in (head.POSITIONAL_ONLY, head.POSITIONAL_OR_KEYWORD) or any(
        p.kind not in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in rest
    ):
        raise TypeError(f"{decorator}: {fn.__name__} must take ({first}, *, arg, ...)")
    return rest


def lifted_from(batch: Any, fn: Callable[..., Any], rest: list[inspect.Parameter]) -> RewardFn:
    """`batch` named and documented as `fn`, with the per-entry args `fn` requires and its
    defaults, which entries are checked against (defaults None: `**kwargs` takes any arg)."""
    for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
        setattr(batch, attr, getattr(fn, attr))
    kw_only = [p for p in rest if p.kind is p.KEYWORD_ONLY]
    batch.__reward_required__ = tuple(p.name for p in kw_only if p.default is p.empty)
    defaults = {p.name: p.default for p in kw_only if p.default is not p.empty}
    batch.__reward_defaults__ = None if len(kw_only) < len(rest) else defaults
    return batch


def _summary(e: BaseException) -> str:
    return "".join(traceback.format_exception(e, limit=-3)).rstrip()


def validate_specs(
    entries: Sequence[Entry],
    where_of: Callable[[int], str] | None = None,
    setup: Mapping[str, Mapping[str, Any]] | None = None,
    registry: RewardRegistry = REWARDS,
    instances: Mapping[str, Any] | None = None,
) -> None:
    """Check every entry's reward specs before training; raise the first problem, count the rest.

    `setup[name]` are config-level defaults of a function reward's args (constructor kwargs for a
    class reward, so they do not count as per-entry args there). Built class rewards in
    `instances` may check their per-entry args themselves with `check_args(args)`.
    """
    where_of, setup = where_of or (lambda i: f"entry {i}"), setup or {}
    errors: list[RewardSpecError] = []
    for i, entry in enumerate(entries):
        try:
            if not entry.rewards:
                raise RewardSpecError(f"{where_of(i)}: no reward; give the entry a 'rewards' field")
            for spec in entry.rewards:
                if spec.name not in registry:
                    valid = ", ".join(sorted(registry))
                    msg = f"{where_of(i)}: unknown reward {spec.name!r}; valid names: {valid}"
                    raise UnknownRewardError(msg)
                if not math.isfinite(spec.weight):
                    msg = f"{where_of(i)}: reward {spec.name!r} has weight {spec.weight}"
                    raise RewardSpecError(msg + "; use a finite number")
                rdef: RewardDef = registry[spec.name]
                base = {} if rdef.is_class else {**rdef.setup_defaults, **setup.get(spec.name, {})}
                rdef.check_args({**base, **spec.args}, where_of(i))
                check = getattr((instances or {}).get(spec.name), "check_args", None)
                try:
                    if check is not None:
                        check(spec.args)
                except (ValueError, TypeError, KeyError) as e:
                    raise RewardSpecError(f"{where_of(i)}: reward {spec.name!r}: {e}") from None
        except RewardSpecError as e:
            errors.append(e)
    if errors:
        more = f" (and {len(errors) - 1} more entries with reward problems)" * (len(errors) > 1)
        raise type(errors[0])(f"{errors[0]}{more}")


@dataclass
class RewardResult:
    """Rewards of one batch. K = len(names); failed samples are NaN in `total`."""

    total: Tensor  # (N,) float32 weighted sum; NaN if a weighted component failed
    components: Tensor  # (N, K) raw reward; NaN where failed or unused
    weights: Tensor  # (N, K) weight in the sum; 0 where unused
    used: Tensor  # (N, K) bool: the sample's entry asks for this reward
    names: list[str]
    failures: dict[str, int]  # failed samples per reward, this batch


class RewardComputer:
    """Holds a run's reward callables; scores a batch calling each reward once."""

    def __init__(
        self,
        setup: Mapping[str, Mapping[str, Any]] | None = None,
        names: Iterable[str] = (),
        registry: RewardRegistry = REWARDS,
    ) -> None:
        self.setup = {k: dict(v or {}) for k, v in (setup or {}).items()}
        self.registry = registry
        self.fns: dict[str, RewardFn] = {}
        self.default_args: dict[str, dict[str, Any]] = {}
        self.failure_totals: dict[str, int] = {}
        self.last_errors: dict[str, str] = {}  # the newest error of each reward, for the stop
        self._logged: set[tuple[str, str]] = set()
        for name in sorted(set(self.setup) | set(names)):
            self._build(name)

    @property
    def names(self) -> list[str]:
        return list(self.fns)  # build order: sorted at construction, then first use

    def _build(self, name: str) -> None:
        rdef: RewardDef = self.registry[name]
        kw = {**rdef.setup_defaults, **self.setup.get(name, {})}
        if rdef.is_class:
            try:
                self.fns[name] = rdef.obj(**kw)
            except TypeError as e:
                raise RewardSpecError(f"reward setup of {name!r}: {e}") from None
        else:
            rdef.check_args(kw, f"reward setup of {name!r}", partial=True)
            self.fns[name], self.default_args[name] = rdef.obj, kw
        self.failure_totals.setdefault(name, 0)

    def validate(
        self, entries: Sequence[Entry], where_of: Callable[[int], str] | None = None
    ) -> None:
        """`validate_specs` with this run's setup and built class rewards."""
        validate_specs(entries, where_of, self.setup, self.registry, self.fns)

    def _log_once(self, name: str, kind: str, msg: str, level: int = logging.ERROR) -> None:
        if (name, kind) not in self._logged:
            self._logged.add((name, kind))
            logger.log(level, "%s (logged once per reward)", msg)

    def _run(self, name: str, outputs: list, args: list[dict], ctx: RewardContext) -> list[float]:
        """Call one reward; any misbehaviour turns into NaN for the samples it scored."""
        n = len(outputs)
        try:
            raw = self.fns[name](outputs, args, ctx)
            raw = raw.detach().cpu().reshape(-1).tolist() if isinstance(raw, Tensor) else list(raw)
        except Exception as e:
            msg = f"reward {name!r} failed on {n} samples, all count as failed: {_summary(e)}"
            self.last_errors[name] = f"{type(e).__name__}: {e}"
            self._log_once(name, "raised", msg)
            return [math.nan] * n
        if len(raw) != n:
            msg = f"reward {name!r} returned {len(raw)} values for {n} outputs; all count as failed"
            self._log_once(name, "length", msg)
            return [math.nan] * n
        vals = [_as_float(v) for v in raw]
        bad = [v for v, f in zip(raw, vals) if math.isnan(f)]
        if bad:
            msg = f"reward {name!r} gave {len(bad)} of {n} samples no finite score, e.g. {bad[0]!r}"
            self.last_errors[name] = getattr(self.fns[name], "last_error", None) or msg
            self._log_once(name, "value", msg + "; they count as failed", logging.WARNING)
        return vals

    def __call__(self, outputs: Sequence[Any], ctx: RewardContext) -> RewardResult:
        n = len(outputs)
        if len(ctx.entries) != n or len(ctx.group_ids) != n:
            raise ValueError(
                f"{n} outputs, {len(ctx.entries)} entries, {len(ctx.group_ids)} group ids"
            )
        calls: dict[str, list[tuple[int, float, dict]]] = {}
        for i, entry in enumerate(ctx.entries):
            for spec in entry.rewards:
                if spec.name not in self.fns:
                    self._build(spec.name)
                args = {**self.default_args.get(spec.name, {}), **spec.args}
                calls.setdefault(spec.name, []).append((i, float(spec.weight), args))
        names = self.names
        # plain lists while filling: per-element tensor writes cost microseconds each
        vsum, weights, counts = ([[0.0] * len(names) for _ in range(n)] for _ in range(3))
        total = [0.0] * n
        failures = dict.fromkeys(names, 0)
        for name, items in calls.items():
            idx, k = [i for i, _, _ in items], names.index(name)
            vals = self._run(
                name, [outputs[i] for i in idx], [a for *_, a in items], ctx.subset(idx)
            )
            for (i, w, _), v in zip(items, vals):
                vsum[i][k] += v  # NaN sticks: a repeated reward fails if any repeat failed
                counts[i][k] += 1
                weights[i][k] += w
                failures[name] += math.isnan(v)
                if w != 0:  # a weight-0 reward only monitors: its failure spares the sample
                    total[i] += w * v
            self.failure_totals[name] += failures[name]
        f64 = lambda x: torch.tensor(x, dtype=torch.float64).reshape(n, len(names))  # noqa: E731
        vsum_t, weights_t, counts_t = f64(vsum), f64(weights), f64(counts)
        total_t = torch.tensor(total, dtype=torch.float64)
        total_t[counts_t.sum(1) == 0] = math.nan  # an entry without rewards says nothing
        comp = vsum_t / counts_t  # mean over repeats; 0/0 = NaN where unused
        return RewardResult(
            total_t.float(), comp.float(), weights_t.float(), counts_t > 0, names, failures
        )

    def on_iteration_end(self, step: int) -> None:
        """Forward to rewards that update themselves (e.g. a reward model trained online)."""
        for fn in self.fns.values():
            hook = getattr(fn, "on_iteration_end", None)
            if hook is not None:
                hook(step)


def _as_float(v: Any) -> float:
    """A reward's value -> float; None, NaN, inf and non-numbers -> NaN (failed)."""
    v = v.item() if isinstance(v, Tensor) and v.numel() == 1 else v
    f = float(v) if isinstance(v, numbers.Real) else math.nan  # numbers.Real: bool, numpy too
    return f if math.isfinite(f) else math.nan


def build_rewards(
    setup: Mapping[str, Mapping[str, Any]] | None = None,
    entries: Sequence[Entry] = (),
    registry: RewardRegistry = REWARDS,
) -> RewardComputer:
    """Instantiate the rewards named in `setup` or used by `entries`, after validating entries."""
    computer = RewardComputer(
        setup, {s.name for e in entries for s in e.rewards if s.name in registry}, registry
    )
    if entries:
        computer.validate(entries)
    return computer


def metrics(result: RewardResult) -> dict[str, float]:
    """NaN-aware logging scalars: overall and per-reward mean/std (population), failures."""
    out: dict[str, float] = {}

    def stats(prefix: str, x: Tensor) -> None:
        x = x[~torch.isnan(x)].double()
        out[f"{prefix}/mean"] = x.mean().item() if x.numel() else math.nan
        out[f"{prefix}/std"] = x.std(correction=0).item() if x.numel() else math.nan

    stats("reward", result.total)
    n = result.total.numel()
    out["reward/failed_frac"] = torch.isnan(result.total).sum().item() / n if n else 0.0
    for k, name in enumerate(result.names):
        stats(f"reward/{name}", result.components[:, k])
        used = int(result.used[:, k].sum())
        out[f"reward/{name}/failures"] = float(result.failures.get(name, 0))
        out[f"reward/{name}/failed_frac"] = result.failures.get(name, 0) / used if used else 0.0
    return out


reward_metrics = metrics  # the name callers use beside other metric helpers
