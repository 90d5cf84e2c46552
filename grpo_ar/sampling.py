"""KV-cached group sampling for any transformers causal LM, and teacher-forced log-probs under
the very same logits transform, for every modality.

One transform (`transform_logits`) turns raw logits into the distribution that is sampled from:
CFG combination, allowed-token ranges, temperature, top-k, top-p, min-p. Recomputing log-probs
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

from .core.logprobs import logprobs_and_entropy
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


def transform_logits(
    logits: Tensor,
    params: SamplingParams,
    allowed: Tensor | None,
    filters: bool = True,
    forbid_eos: bool = False,
) -> Tensor:
    """(R, V) raw (CFG-combined) logits -> (R, V) fp32 logits of the sampling distribution,
    -inf on excluded tokens. Order: allowed ranges, temperature, top-k, top-p, min-p."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / params.temperature
    if allowed is not None:
        z = z.masked_fill(~allowed, NEG_INF)
    if forbid_eos and params.eos_token_ids:
        z[:, list(params.eos_token_ids)] = NEG_INF
    if not filters:
        return z
    if params.top_k > 0 and params.top_k < z.shape[-1]:
        kth = torch.topk(z, params.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, NEG_INF)
    if params.top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = sorted_z.softmax(-1)
        # drop a token when the mass before it already reaches top_p; the first always stays
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, NEG_INF)
    if params.min_p > 0.0:
        probs = z.softmax(-1)
        z = z.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), NEG_INF)
    return z


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float, detach_uncond: bool = False) -> Tensor:
    """u + s·(c - u) on raw logits."""
    if detach_uncond:
        uncond = uncond.detach()
    return uncond + scale * (cond - uncond)


@lru_cache(maxsize=64)
def _takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def _forward(model: Any, ids: Tensor, mask: Tensor, pos: Tensor, cache: Any, keep: int) -> Any:
    kw: dict[str, Any] = dict(
        input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=cache is not None
    )
    if cache is not None:
        kw["past_key_values"] = cache
    if _takes_logits_to_keep(type(model)):
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


@torch.no_grad()
def sample(
    model: Any,
    prompts: PromptBatch,
    group_size: int,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    greedy: bool = False,
    share_prefix: bool = True,
) -> Rollout:
    """Sample `group_size` completions per prompt with a KV cache.

    With `share_prefix` each prompt is prefilled once and its cache expanded to the G members
    of its group; without it the prompt is repeated G times (the naive reference).
    """
    g = group_size
    cfg = params.uses_cfg
    ids, mask = _stack_cfg(prompts) if cfg else (prompts.input_ids, prompts.attention_mask)
    if not share_prefix:
        ids, mask = ids.repeat_interleave(g, 0), mask.repeat_interleave(g, 0)
    pos = _positions(mask)
    from transformers import DynamicCache

    cache = DynamicCache()
    out = _forward(model, ids, mask, pos, cache, keep=1)
    logits, cache = out.logits[:, -1], out.past_key_values
    if share_prefix:
        cache.batch_repeat_interleave(g)
        logits, mask, pos = (t.repeat_interleave(g, 0) for t in (logits, mask, pos))
    pos = pos[:, -1:]
    n = len(prompts) * g
    device = logits.device
    allowed = allowed_mask(params, logits.shape[-1], device)
    eos = torch.tensor(params.eos_token_ids, dtype=torch.long, device=device)
    tokens = torch.full(
        (n, params.max_new_tokens), params.pad_token_id, dtype=torch.long, device=device
    )
    logps = torch.zeros(n, params.max_new_tokens, device=device)
    live = torch.ones(n, dtype=torch.bool, device=device)
    t = 0
    for t in range(params.max_new_tokens):
        step_logits = cfg_combine(logits[:n], logits[n:], params.cfg_scale) if cfg else logits
        z = transform_logits(
            step_logits, params, allowed, filters=not greedy, forbid_eos=t < params.min_new_tokens
        )
        logp_all = torch.log_softmax(z, -1)
        if greedy:
            tok = z.argmax(-1)
        else:
            tok = torch.multinomial(logp_all.exp(), 1, generator=generator).squeeze(-1)
        tok = torch.where(live, tok, torch.full_like(tok, params.pad_token_id))
        tokens[:, t] = tok
        logps[:, t] = torch.where(live, logp_all.gather(-1, tok[:, None]).squeeze(-1), 0.0)
        if eos.numel():
            live = live & ~torch.isin(tok, eos)
        if not live.any() or t == params.max_new_tokens - 1:
            break
        feed = torch.cat([tok, tok]) if cfg else tok
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        pos = pos + 1
        out = _forward(model, feed[:, None], mask, pos, cache, keep=1)
        logits, cache = out.logits[:, -1], out.past_key_values
    width = t + 1
    tokens, logps = tokens[:, :width], logps[:, :width]
    steps = torch.arange(width, device=device)
    if eos.numel():
        is_eos = torch.isin(tokens, eos)
        first = torch.where(
            is_eos.any(1), is_eos.float().argmax(1), torch.full((n,), width, device=device)
        )
        truncated = ~is_eos.any(1)
    else:
        first, truncated = (
            torch.full((n,), width, device=device),
            torch.zeros(n, dtype=torch.bool, device=device),
        )
    comp_mask = (steps[None] <= first[:, None]).float()
    prompt_index = torch.arange(len(prompts), device=device).repeat_interleave(g)
    return Rollout(
        prompts=prompts,
        group_size=g,
        completion_ids=tokens,
        completion_mask=comp_mask,
        sampling_logp=logps * comp_mask,
        truncated=truncated,
        prompt_index=prompt_index,
        group_ids=prompt_index.clone(),
    )


def _logits_for_completions(
    model: Any, ids: Tensor, mask: Tensor, comp: Tensor, comp_mask: Tensor
) -> Tensor:
    """(n, L) prompts + (n, T) completions -> (n, T, V) logits predicting each completion token."""
    full = torch.cat([ids, comp], 1)
    full_mask = torch.cat([mask.long(), comp_mask.long()], 1)
    t = comp.shape[1]
    logits = _forward(model, full, full_mask, _positions(full_mask), None, keep=t + 1).logits
    return logits[:, -(t + 1) : -1]


def token_logprobs(
    model: Any,
    rollout: Rollout,
    params: SamplingParams,
    with_entropy: bool = False,
    detach_uncond: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Teacher-forced (n, T) log-probs (and entropies) of the rollout's tokens under the
    sampling transform; 0 under mask == 0. Differentiable."""
    prompts, idx = rollout.prompts, rollout.prompt_index
    comp, comp_mask = rollout.completion_ids, rollout.completion_mask
    logits = _logits_for_completions(
        model, prompts.input_ids[idx], prompts.attention_mask[idx], comp, comp_mask
    )
    if params.uses_cfg:
        if prompts.uncond_input_ids is None or prompts.uncond_attention_mask is None:
            raise ValueError("cfg_scale != 1 needs unconditional prompts in the rollout")
        ulogits = _logits_for_completions(
            model,
            prompts.uncond_input_ids[idx],
            prompts.uncond_attention_mask[idx],
            comp,
            comp_mask,
        )
        logits = cfg_combine(logits, ulogits, params.cfg_scale, detach_uncond)
    allowed = allowed_mask(params, logits.shape[-1], logits.device)
    filters = params.train_filters and params.filters_on()
    forbid_upto = params.min_new_tokens if params.eos_token_ids else 0
    if allowed is None and not filters and forbid_upto == 0:
        logp, ent = logprobs_and_entropy(logits, comp, params.temperature, with_entropy)
    else:
        transform = _position_transform(params, allowed, filters, forbid_upto, comp.shape[1])
        logp, ent = logprobs_and_entropy(logits, comp, 1.0, with_entropy, transform=transform)
    m = comp_mask.bool()
    logp = logp.masked_fill(~m, 0.0)
    return logp, None if ent is None else ent.masked_fill(~m, 0.0)


def _position_transform(
    params: SamplingParams, allowed: Tensor | None, filters: bool, forbid_upto: int, width: int
) -> Any:
    """The sampler's transform for flattened (n·T, V) rows; row r is completion position r % T,
    where EOS is banned before `min_new_tokens` exactly as during sampling."""
    eos = list(params.eos_token_ids)

    def fn(z: Tensor, start: int) -> Tensor:
        if forbid_upto:
            pos = torch.arange(start, start + z.shape[0], device=z.device) % width
            ban = torch.zeros_like(z, dtype=torch.bool)
            ban[:, eos] = (pos < forbid_upto)[:, None]
            z = z.masked_fill(ban, NEG_INF)
        return transform_logits(z, params, allowed, filters)

    return fn
