"""KV-cached group sampling for any transformers causal LM, for every modality.

Tokens are drawn from `params.transform_logits` (the distribution teacher-forced scoring
recomputes, `generation.scoring.token_logprobs`), and each chosen token's log-prob under it is
recorded as the rollout's `sampling_logp`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..types import PromptBatch, Rollout
from .decode_step import Decoder
from .model_call import stack_cfg
from .params import SamplingParams, allowed_mask, cfg_combine, position_masks, transform_logits


class Draw:
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
        return inverse_cdf(z, u if rows is None else u[rows])


def inverse_cdf(z: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """(R, V) transformed logits, (R, 1) uniforms -> (R,) tokens drawn from softmax(z) and their
    log-probs."""
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
    check_every: int | None = None,
) -> Rollout:
    """Sample `group_size` completions per prompt with a preallocated KV cache.

    With `share_prefix` each prompt is prefilled once and its cache gathered to the G members of
    its group; without it the prompt is repeated G times. Finished rows are dropped from the batch
    once half of it has finished. `use_cache=False` re-runs the whole sequence every step (the
    slow reference the cached path is tested against). `fast` lets Llama-style models take
    `decode_step.FastStep` instead of the HF forward for the one-token steps.
    `prompts.extras["shard"] = (first, total)`: these prompts are prompts first.. of a global
    batch of `total` (one rank's share); the draws equal the global batch's (see `Draw`).
    `check_every`: read the finished rows on the host every this many tokens (None: each token
    on the CPU, where the read is free; every 8 on an accelerator, whose queue a read drains).
    Rows keep drawing past their EOS until the next read; `finish_rollout` masks those tokens.
    """
    g, n = group_size, len(prompts) * group_size
    cfg = params.uses_cfg
    ids, mask = stack_cfg(prompts) if cfg else (prompts.input_ids, prompts.attention_mask)
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
    first, total = prompts.extras.get("shard", (0, len(prompts)))  # see Draw
    draw = Draw(n, generator, greedy, offset=first * g, total=total * g)
    rows = torch.arange(n, device=device)  # the original row of each running row
    alive = torch.ones(n, dtype=torch.bool, device=device)
    every = check_every or (1 if device.type == "cpu" else 8)
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
        if width == params.max_new_tokens:
            break
        if width % every == 0:  # the one host read of finished rows
            running = int(alive.sum())
            if running == 0:
                break
            if 2 * running <= k:  # finished rows leave the batch
                keep = alive.nonzero().squeeze(-1)
                rows, tok, alive = rows[keep], tok[keep], alive[keep]
                dec.select(torch.cat([keep, keep + k]) if cfg else keep)
        logits = dec.step(torch.cat([tok, tok]) if cfg else tok)
    if every > 1 and eos.numel():  # drop the columns drawn after every row had ended
        width = used_width(tokens[:, :width], eos)
    return finish_rollout(prompts, g, tokens[:, :width], logps[:, :width], eos, params.pad_token_id)


def used_width(tokens: Tensor, eos: Tensor) -> int:
    """Columns up to the latest first EOS of any row (all of them if a row has none)."""
    is_eos = torch.isin(tokens, eos)
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), tokens.shape[1] - 1)
    return int(first.max()) + 1 if len(tokens) else tokens.shape[1]


def finish_rollout(
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
