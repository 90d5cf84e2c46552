"""The sampling distribution: `SamplingParams` and the one logits transform (CFG combination,
allowed-token ranges, per-position ranges, temperature, top-k, top-p, min-p) that the sampler
draws from and teacher-forced scoring recomputes, so training log-probs equal the sampler's."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError

NEG_INF = float("-inf")


@dataclass(frozen=True)
class TreeParams:
    """Tree sampling (`[sampling.tree]`, generation/tree.py): each prompt's G completions are the
    leaves of trees whose nodes are token segments; a segment's children continue from its KV
    cache rows, so siblings share their prefix (TGTS / TreePO arXiv 2508.17445)."""

    branching: int = 1
    """Children per fork (1 = off: G independent samples)."""
    depth: int = 0
    """Forks from root to leaf; G / branching**depth roots per prompt (must divide)."""
    segment_tokens: int = 0
    """Fork after this many tokens of a segment (0 = only at separators)."""
    separator_ids: tuple[int, ...] = ()
    """Fork right after sampling one of these tokens (e.g. a newline), if before segment_tokens."""
    fork_entropy: float = 0.0
    """Fork before drawing a token whose sampling distribution has entropy (nats) above this,
    so the children differ at the uncertain token (TreePO's heuristic branching; 0 = off)."""

    def __post_init__(self) -> None:
        if self.branching < 1 or self.depth < 0 or self.segment_tokens < 0 or self.fork_entropy < 0:
            raise ValueError(
                f"sampling.tree: branching={self.branching} must be >= 1, depth={self.depth} "
                f", segment_tokens={self.segment_tokens} and fork_entropy={self.fork_entropy} >= 0"
            )
        if self.enabled and not (self.segment_tokens or self.separator_ids or self.fork_entropy):
            raise ValueError(
                "sampling.tree: branching > 1 and depth > 0 need a fork rule: set "
                "segment_tokens (fork every N tokens), separator_ids (fork after those tokens) "
                "or fork_entropy (fork before an uncertain token)"
            )

    @property
    def enabled(self) -> bool:
        return self.branching > 1 and self.depth > 0

    def fills(self, group_size: int) -> bool:
        """Whether tree sampling is on and makes exactly `group_size` leaves per prompt."""
        return self.enabled and group_size % self.branching**self.depth == 0

    def roots(self, group_size: int) -> int:
        """Root segments per prompt; raises when the leaves cannot number exactly group_size."""
        leaves = self.branching**self.depth
        if group_size % leaves:
            raise ValueError(
                f"sampling.tree: branching={self.branching}, depth={self.depth} give "
                f"{leaves} leaves per root, which does not divide group_size={group_size}; "
                "choose them so that branching**depth divides the group size"
            )
        return group_size // leaves


@dataclass(frozen=True)
class Span:
    """One span type of a completion."""

    name: str
    length: int = 0
    """Fixed number of tokens (0 = until `close_token`)."""
    close_token: int | None = None
    """Token that ends the span (it belongs to the span); always allowed inside it."""
    allowed_ranges: tuple[tuple[int, int], ...] = ()
    """Half-open token-id ranges that may be sampled in this span (empty = all)."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    loss_weight: float = 1.0
    """Weight of this span's tokens in the policy loss."""
    kl_weight: float = 1.0
    """Weight of this span's tokens in the KL term."""

    def __post_init__(self) -> None:
        if (self.length > 0) == (self.close_token is not None):
            raise ValueError(f"span {self.name!r}: give exactly one of length > 0 or close_token")

    def params(self, base: SamplingParams) -> SamplingParams:
        """The sampling transform of this span (its filters on the run's other settings)."""
        ranges = self.allowed_ranges
        if ranges and self.close_token is not None:
            ranges = (*ranges, (self.close_token, self.close_token + 1))
        return replace(
            base, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            allowed_ranges=ranges, position_ranges=(), min_new_tokens=0, tree=TreeParams(), spans=(),
        )  # fmt: skip


def as_span(x: Span | dict) -> Span:
    """A `[[sampling.spans]]` table -> Span (range lists become tuples)."""
    if isinstance(x, Span):
        return x
    if not isinstance(x, dict):
        raise ValueError(
            f"sampling.spans holds tables (name, length | close_token, ...), got {x!r}"
        )
    kw = dict(x)
    kw["allowed_ranges"] = tuple(tuple(r) for r in kw.get("allowed_ranges", ()))
    try:
        return Span(**kw)
    except TypeError as e:
        fields = ", ".join(Span.__dataclass_fields__)
        raise ValueError(f"sampling.spans: {e}; a span takes {fields}") from None


@dataclass(frozen=True)
class SamplingParams:
    """How completions are sampled (and how their log-probs are recomputed for training).

    Token-id ranges are half-open: `(lo, hi)` allows `lo <= id < hi`. EOS (`eos_token_ids`) is
    always allowed where sampling may end, even outside `allowed_ranges`. An adapter derives
    what its modality fixes (lengths, code ranges, EOS, layout positions) with `impose`, which
    refuses a field the user set to something else; `adapter.sampling` is then the one set of
    parameters a run uses (the trainer writes it to config.yaml)."""

    max_new_tokens: int = 64
    """Completion budget in tokens."""
    min_new_tokens: int = 0
    """EOS is forbidden before this many tokens."""
    temperature: float = 1.0
    """Softmax temperature (> 0)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set with mass >= top_p (1 = off)."""
    min_p: float = 0.0
    """Drop tokens below min_p × the top probability (0 = off)."""
    allowed_ranges: tuple[tuple[int, int], ...] = ()
    """Half-open [lo, hi) token-id ranges that may be sampled (empty = all); EOS stays allowed."""
    position_ranges: tuple[tuple[int, int, int], ...] = ()
    """(t, lo, hi): at completion position t only [lo, hi) may be sampled, in place of
    allowed_ranges (triples of one t form a union; EOS is not added). (t, x, x + 1) forces token x
    at t, which then has log-prob 0 (adapters force layout tokens this way, e.g. Emu3 EOL/EOF)."""
    eos_token_ids: tuple[int, ...] = ()
    """Tokens that end a completion (empty = fixed-length generation)."""
    pad_token_id: int = 0
    """Filler after EOS."""
    cfg_scale: float = 1.0
    """Classifier-free guidance scale s: logits u + s·(c - u) over paired rows (1 = off)."""
    train_filters: bool = True
    """Apply top-k/top-p/min-p when recomputing log-probs, so training sees the sampled
    distribution exactly; False trains on the temperature-only distribution (TRL's choice) and
    leaves the gap to importance-sampling correction."""
    tree: TreeParams = TreeParams()
    """Tree sampling of each group (off by default); see TreeParams."""
    spans: tuple[Span, ...] = ()
    """Typed spans of a completion, in order (generation/spans.py); empty = one plain span."""

    def __post_init__(self) -> None:
        for r in self.allowed_ranges:
            if not (isinstance(r, (tuple, list)) and len(r) == 2):
                raise ValueError(
                    f"allowed_ranges holds [lo, hi) pairs of token ids, got {r!r} in "
                    f"{list(self.allowed_ranges)}: write e.g. [[3, 10], [20, 25]]"
                )
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in r):
                raise ValueError(f"allowed_ranges: {r!r} must hold two integer token ids")
        if any(not isinstance(x, Span) for x in self.spans):  # [[sampling.spans]] tables
            object.__setattr__(self, "spans", tuple(map(as_span, self.spans)))
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (
                0 <= self.min_new_tokens <= self.max_new_tokens,
                f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}",
            ),
            (
                self.temperature > 0,
                f"temperature must be > 0, got {self.temperature} (greedy is an eval option)",
            ),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p}"),
            (self.cfg_scale >= 0, f"cfg_scale must be >= 0, got {self.cfg_scale}"),
            (
                all(0 <= lo < hi for lo, hi in self.allowed_ranges),
                f"allowed_ranges must be [lo, hi) pairs with 0 <= lo < hi, got {self.allowed_ranges}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        self._check_position_ranges()

    def _check_position_ranges(self) -> None:
        by_pos: dict[int, list[tuple[int, int]]] = {}
        for rule in self.position_ranges:
            if len(rule) != 3 or not all(isinstance(v, int) for v in rule):
                raise ValueError(f"position_ranges holds (t, lo, hi) int triples, got {rule!r}")
            t, lo, hi = rule
            if not (0 <= t < self.max_new_tokens and 0 <= lo < hi):
                raise ValueError(
                    f"position_ranges: {tuple(rule)} needs 0 <= t < max_new_tokens="
                    f"{self.max_new_tokens} and 0 <= lo < hi"
                )
            by_pos.setdefault(t, []).append((lo, hi))
        for t, ranges in by_pos.items():  # EOS is banned there: the row would have no token
            if t < self.min_new_tokens and all(
                all(x in self.eos_token_ids for x in range(lo, hi)) for lo, hi in ranges
            ):
                raise ValueError(
                    f"position_ranges allow only EOS at position {t} < min_new_tokens="
                    f"{self.min_new_tokens}"
                )

    @property
    def uses_cfg(self) -> bool:
        """Whether classifier-free guidance is on (cfg_scale != 1)."""
        return self.cfg_scale != 1.0

    def filters_on(self) -> bool:
        """Whether any of top-k / top-p / min-p is active."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    def changed(self) -> dict[str, Any]:
        """The fields that differ from their defaults: what a user (or an adapter) set."""
        base = SamplingParams()
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if _plain(getattr(self, f.name)) != _plain(getattr(base, f.name))
        }

    def impose(self, fixed: Mapping[str, tuple[Any, str]]) -> SamplingParams:
        """These parameters with `fixed` = {field: (value, why)} set, as an adapter must; a field
        set to another value than its default and `value` is refused, naming `why`:
        `sampling.max_new_tokens=5 conflicts with the image grid 16x16 = 256 tokens; remove it`."""
        given = self.changed()
        for key, (value, why) in fixed.items():
            if key in given and _plain(given[key]) != _plain(value):
                raise ConfigError(
                    f"sampling.{key}={_plain(given[key])} conflicts with {why}; remove it "
                    f"(the adapter sets {_plain(value)})"
                )
        return replace(self, **{k: v for k, (v, _) in fixed.items()})


def _plain(x: Any) -> Any:
    """Tuples as lists, so a config's [[8, 24]] equals ((8, 24),) and messages read like TOML."""
    return [_plain(v) for v in x] if isinstance(x, (tuple, list)) else x


def allowed_mask(params: SamplingParams, vocab: int, device: torch.device) -> Tensor | None:
    """(V,) bool of samplable tokens, or None when all are allowed."""
    if not params.allowed_ranges:
        return None
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    for lo, hi in params.allowed_ranges:
        if hi > vocab:
            raise ValueError(f"allowed range [{lo}, {hi}) exceeds the vocabulary of {vocab}")
        mask[lo:hi] = True
    for t in params.eos_token_ids:  # EOS always ends a completion, even outside the ranges
        mask[t] = True
    return mask


def position_masks(
    params: SamplingParams, vocab: int, device: torch.device
) -> tuple[Tensor, list[int]] | None:
    """Allowed tokens per completion position: an (M, V) bool table of distinct sets and the
    table row of each of the `max_new_tokens` positions (row 0: `allowed_mask`, all True when
    that is None); None when `params.position_ranges` is empty."""
    if not params.position_ranges:
        return None
    base = allowed_mask(params, vocab, device)
    by_pos: dict[int, set[tuple[int, int]]] = {}
    for t, lo, hi in params.position_ranges:
        if hi > vocab:
            raise ValueError(f"position range [{lo}, {hi}) exceeds the vocabulary of {vocab}")
        by_pos.setdefault(t, set()).add((lo, hi))
    rows = [torch.ones(vocab, dtype=torch.bool, device=device) if base is None else base]
    index: dict[tuple[tuple[int, int], ...], int] = {}
    kinds = [0] * params.max_new_tokens
    for t, ranges in by_pos.items():
        key = tuple(sorted(ranges))
        if key not in index:
            index[key] = len(rows)
            mask = torch.zeros(vocab, dtype=torch.bool, device=device)
            for lo, hi in key:
                mask[lo:hi] = True
            rows.append(mask)
        kinds[t] = index[key]
    return torch.stack(rows), kinds


def transform_logits(
    logits: Tensor,
    params: SamplingParams,
    allowed: Tensor | None,
    filters: bool = True,
    forbid_eos: bool = False,
) -> Tensor:
    """(R, V) raw (CFG-combined) logits -> (R, V) fp32 logits of the sampling distribution,
    -inf on excluded tokens. Order: allowed ranges, temperature, top-k, top-p, min-p."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    z = z / params.temperature if params.temperature != 1.0 else z  # mask_logits never writes z
    return mask_logits(z, params, allowed, filters, forbid_eos)


def mask_logits(
    z: Tensor,
    params: SamplingParams,
    allowed: Tensor | None,
    filters: bool = True,
    forbid_eos: bool | Tensor = False,
) -> Tensor:
    """(R, V) temperature-scaled fp32 logits -> the same with excluded tokens at -inf (allowed
    ranges, EOS before `min_new_tokens`, top-k, top-p, min-p); masking only, so its gradient is
    the masked softmax's. `allowed` is (V,) or one set per row (R, V); `forbid_eos` may be an
    (R,) bool tensor (one flag per row)."""
    if allowed is not None:
        z = z.masked_fill(~allowed, NEG_INF)
    if params.eos_token_ids and forbid_eos is not False:
        eos = torch.zeros(z.shape[-1], dtype=torch.bool, device=z.device)
        eos[list(params.eos_token_ids)] = True
        z = z.masked_fill(
            eos & forbid_eos[:, None] if isinstance(forbid_eos, Tensor) else eos, NEG_INF
        )
    if not filters:
        return z
    if params.top_k > 0 and params.top_k < z.shape[-1]:
        kth = torch.topk(z, params.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, NEG_INF)
    if params.top_p < 1.0:
        z = z.masked_fill(_top_p_drop(z, params.top_p), NEG_INF)
    if params.min_p > 0.0:
        probs = z.softmax(-1)
        z = z.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), NEG_INF)
    return z


# top-p first looks at the TOP_P_PROBE most likely tokens; rows whose nucleus is not inside them
# fall back to a full sort (same result, a partial sort instead of sorting V each step)
TOP_P_PROBE = 256


def _top_p_drop(z: Tensor, top_p: float) -> Tensor:
    """(R, V) bool: tokens outside the smallest set whose mass reaches top_p (the first stays)."""
    v = z.shape[-1]
    k = v if v <= 4 * TOP_P_PROBE else TOP_P_PROBE
    vals, order = torch.topk(z, k, dim=-1, sorted=True)
    probs = (vals - torch.logsumexp(z, -1, keepdim=True)).exp()
    # drop a token when the mass before it already reaches top_p
    drop_sorted = (probs.cumsum(-1) - probs) >= top_p
    covered = drop_sorted[:, -1] if k < v else torch.ones_like(drop_sorted[:, 0])
    drop = torch.ones_like(z, dtype=torch.bool).scatter(-1, order, drop_sorted)
    if not bool(covered.all()):
        rows = (~covered).nonzero().squeeze(-1)
        sorted_z, full_order = torch.sort(z[rows], dim=-1, descending=True)
        p = sorted_z.softmax(-1)
        d = (p.cumsum(-1) - p) >= top_p
        drop[rows] = torch.zeros_like(d).scatter(-1, full_order, d)
    return drop


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float, detach_uncond: bool = False) -> Tensor:
    """u + s·(c - u) on raw logits."""
    if detach_uncond:
        uncond = uncond.detach()
    return uncond + scale * (cond - uncond)
