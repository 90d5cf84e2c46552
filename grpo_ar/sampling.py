"""KV-cached group sampling for any transformers causal LM, and teacher-forced log-probs under
the very same logits transform, for every modality.

One transform (`transform_logits`) turns raw logits into the distribution that is sampled from:
CFG combination, allowed-token ranges (global, or per completion position: layout tokens such as
Emu3's EOL/EOF forced where they belong), temperature, top-k, top-p, min-p. Recomputing log-probs
for training goes through it too, so `token_logprobs` equals the recorded `sampling_logp`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .rollout import PromptBatch, Rollout

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    """How completions are sampled (and how their log-probs are recomputed for training)."""

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
    """Half-open [lo, hi) token-id ranges that may be sampled (empty = all)."""
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

    def __post_init__(self) -> None:
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
        return self.cfg_scale != 1.0

    def filters_on(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


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


@lru_cache(maxsize=64)
def _takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


@lru_cache(maxsize=64)
def cache_kwarg(cls: type) -> str | None:
    """The name under which `cls.forward` takes a KV cache: `cache` (transformers >= 5.24),
    `past_key_values` (earlier releases), or None when it takes none."""
    params = inspect.signature(cls.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in params), None)


def _forward(model: Any, ids: Tensor, mask: Tensor, pos: Tensor, cache: Any, keep: int) -> Any:
    kw: dict[str, Any] = dict(
        input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=cache is not None
    )
    if cache is not None:
        kw[cache_kwarg(type(model)) or "past_key_values"] = cache
    if keep and _takes_logits_to_keep(type(model)):
        kw["logits_to_keep"] = keep
    return model(**kw)


def _stack_cfg(prompts: PromptBatch) -> tuple[Tensor, Tensor]:
    """Cond rows then uncond rows, left-padded to one width: (2P, L)."""
    ids, mask = prompts.input_ids, prompts.attention_mask
    uids, umask = prompts.uncond_input_ids, prompts.uncond_attention_mask
    if uids is None or umask is None:
        raise ValueError("cfg_scale != 1 needs the adapter to build unconditional prompts")
    width = max(ids.shape[1], uids.shape[1])
    pad = lambda t, v: F.pad(t, (width - t.shape[1], 0), value=v)  # noqa: E731
    return torch.cat([pad(ids, 0), pad(uids, 0)]), torch.cat([pad(mask, 0), pad(umask, 0)])


def _positions(mask: Tensor) -> Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class _Draw:
    """Token choice per step. Sampling is inverse-CDF with one uniform drawn for each of the N
    rows every step, so the tokens of a row do not depend on which other rows are still
    running: cached, uncached, shared-prefix and compacted runs agree. (One uniform per row
    instead of a (N, V) exponential race: 0.8 vs 19 ms a step at V = 49,152 on one CPU thread.)

    A shard (rows `offset .. offset + n` of a global batch of `total` rows, e.g. one rank's
    prompts under torchrun) draws the whole batch's uniforms and keeps its slice, so with the
    same generator state it samples exactly what the whole batch would in one process."""

    def __init__(
        self,
        n: int,
        generator: torch.Generator | None,
        greedy: bool,
        offset: int = 0,
        total: int | None = None,
    ) -> None:
        self.n, self.generator, self.greedy = n, generator, greedy
        self.offset, self.total = offset, n if total is None else total
        if not 0 <= offset <= self.total - n:
            raise ValueError(f"shard rows {offset}..{offset + n} outside a batch of {self.total}")

    def __call__(self, z: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor]:
        """(R, V) transformed logits of rows `rows` (None = all) -> (R,) tokens and log-probs."""
        if self.greedy:
            tok = z.argmax(-1)
            return tok, z.gather(-1, tok[:, None]).squeeze(-1) - torch.logsumexp(z, -1)
        u = torch.rand(self.total, 1, generator=self.generator, device=z.device)
        u = u[self.offset : self.offset + self.n]
        u = u if rows is None else u[rows]
        probs = z.to(torch.promote_types(z.dtype, torch.float32)).softmax(-1)
        cdf = probs.cumsum(-1)
        mass = cdf[:, -1:].contiguous()
        # the first token whose CDF exceeds u·mass; `right=True` never lands on a zero-probability
        # token (a flat step of the CDF). u·mass may round up to mass: cap at the first token
        # that reaches it (the last one with probability > 0).
        tok = torch.searchsorted(cdf, u * mass, right=True)
        tok = torch.minimum(tok, torch.searchsorted(cdf, mass)).squeeze(-1)
        return tok, probs.gather(-1, tok[:, None]).squeeze(-1).log()


@torch.no_grad()
def sample(
    model: Any,
    prompts: PromptBatch,
    group_size: int,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    greedy: bool = False,
    share_prefix: bool = True,
    use_cache: bool = True,
    fast: bool = True,
) -> Rollout:
    """Sample `group_size` completions per prompt with a preallocated KV cache.

    With `share_prefix` each prompt is prefilled once and its cache gathered to the G members of
    its group; without it the prompt is repeated G times. Finished rows are dropped from the batch
    once half of it has finished. `use_cache=False` re-runs the whole sequence every step (the
    slow reference the cached path is tested against). `fast` lets Llama-style models take
    `decoding.FastStep` instead of the HF forward for the one-token steps.
    `prompts.extras["shard"] = (first, total)`: these prompts are prompts first.. of a global
    batch of `total` (one rank's share); the draws equal the global batch's (see `_Draw`).
    """
    from .decoding import Decoder

    g, n = group_size, len(prompts) * group_size
    cfg = params.uses_cfg
    ids, mask = _stack_cfg(prompts) if cfg else (prompts.input_ids, prompts.attention_mask)
    dec = Decoder(model, params, use_cache, fast)
    logits = dec.prefill(ids, mask, g, share_prefix)  # (N or 2N, V)
    device = logits.device
    allowed = allowed_mask(params, logits.shape[-1], device)
    per_pos = position_masks(params, logits.shape[-1], device)
    eos = torch.tensor(params.eos_token_ids, dtype=torch.long, device=device)
    shape = (n, params.max_new_tokens)
    tokens = torch.full(shape, params.pad_token_id, dtype=torch.long, device=device)
    logps = torch.zeros(
        shape, device=device, dtype=torch.promote_types(logits.dtype, torch.float32)
    )
    first, total = prompts.extras.get("shard", (0, len(prompts)))  # see _Draw
    draw = _Draw(n, generator, greedy, offset=first * g, total=total * g)
    rows = torch.arange(n, device=device)  # the original row of each running row
    alive = torch.ones(n, dtype=torch.bool, device=device)
    width = 0
    for t in range(params.max_new_tokens):
        k = rows.shape[0]
        step = cfg_combine(logits[:k], logits[k:], params.cfg_scale) if cfg else logits
        at = allowed if per_pos is None else per_pos[0][per_pos[1][t]]
        z = transform_logits(step, params, at, not greedy, t < params.min_new_tokens)
        tok, lp = draw(z, None if k == n else rows)
        tokens[rows, t], logps[rows, t] = tok, lp
        width = t + 1
        if eos.numel():
            alive = alive & ~torch.isin(tok, eos)
        if width == params.max_new_tokens or not bool(alive.any()):
            break
        if 2 * int(alive.sum()) <= k:  # finished rows leave the batch
            keep = alive.nonzero().squeeze(-1)
            rows, tok, alive = rows[keep], tok[keep], alive[keep]
            dec.select(torch.cat([keep, keep + k]) if cfg else keep)
        logits = dec.step(torch.cat([tok, tok]) if cfg else tok)
    return _finish(prompts, g, tokens[:, :width], logps[:, :width], eos, params.pad_token_id)


def _finish(
    prompts: PromptBatch, g: int, tokens: Tensor, logps: Tensor, eos: Tensor, pad: int
) -> Rollout:
    """Mask everything after the first EOS (pad tokens, log-prob 0) and build the Rollout.
    Without EOS tokens (fixed-length generation, e.g. image grids) no row counts as truncated."""
    n, width = tokens.shape
    device = tokens.device
    steps = torch.arange(width, device=device)
    is_eos = torch.isin(tokens, eos) if eos.numel() else torch.zeros_like(tokens, dtype=torch.bool)
    ended = is_eos.any(1)
    first = torch.where(ended, is_eos.float().argmax(1), torch.full((n,), width, device=device))
    comp_mask = (steps[None] <= first[:, None]).float()
    tokens = tokens.masked_fill(comp_mask == 0, pad)
    prompt_index = torch.arange(len(prompts), device=device).repeat_interleave(g)
    return Rollout(
        prompts=prompts,
        group_size=g,
        completion_ids=tokens,
        completion_mask=comp_mask,
        sampling_logp=logps * comp_mask,
        truncated=~ended if eos.numel() else torch.zeros_like(ended),
        prompt_index=prompt_index,
        group_ids=prompt_index.clone(),
    )


def token_logprobs(
    model: Any,
    rollout: Rollout,
    params: SamplingParams,
    with_entropy: bool = False,
    detach_uncond: bool = False,
    share_prefix: bool | None = None,
    fused: bool | None = None,
    pack: bool | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Teacher-forced (n, T) log-probs (and entropies) of the rollout's tokens under the
    sampling transform; 0 under mask == 0. Differentiable. See `grpo_ar.scoring`."""
    from .scoring import token_logprobs as score

    return score(model, rollout, params, with_entropy, detach_uncond, share_prefix, fused, pack)
