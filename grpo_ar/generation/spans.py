"""Typed token spans: a completion made of spans of declared types (e.g. a text plan, then an
image grid), each with its own allowed tokens, temperature / top-k / top-p, loss weight and KL
weight (T2I-R1's BiCoT writes a short plan and then the image tokens in one completion).

The sampler (`span_sample`) switches a row to the next span when the current one has `length`
tokens or has just sampled its `close_token`; the completion ends with the last span. The
rollout records each token's span in `span_ids` and each token's weights in
`data["span_loss_weight"]` / `data["span_kl_weight"]` (the trainer's token objective multiplies
the policy term and the KL term by them). `span_token_logprobs` recomputes every token's
log-prob under its own span's transform, so it equals the sampler's `sampling_logp`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..types import PromptBatch, Rollout
from .decode_step import Decoder
from .params import SamplingParams, Span, allowed_mask, transform_logits
from .sampler import Draw
from .scoring import completion_outputs


@torch.no_grad()
def span_sample(
    model: Any, prompts: PromptBatch, group_size: int, params: SamplingParams,
    generator: torch.Generator | None = None, greedy: bool = False,
) -> Rollout:  # fmt: skip
    """G completions per prompt, span after span (`params.spans`); rows leave when their last
    span ends."""
    spans = params.spans
    if params.uses_cfg:
        raise ValueError("typed spans do not support cfg_scale != 1")
    n, width = len(prompts) * group_size, params.max_new_tokens
    dec = Decoder(model, params, True, True)
    logits = dec.prefill(prompts.input_ids, prompts.attention_mask, group_size, True)  # (N, V)
    device, vocab = logits.device, logits.shape[-1]
    sp = [s.params(params) for s in spans]
    allowed = [allowed_mask(p, vocab, device) for p in sp]
    close = torch.tensor(
        [-1 if s.close_token is None else s.close_token for s in spans], device=device
    )
    length = torch.tensor([s.length for s in spans], device=device)
    tokens = torch.full((n, width), params.pad_token_id, dtype=torch.long, device=device)
    wide = torch.promote_types(logits.dtype, torch.float32)  # fp32, or an fp64 model's fp64
    logps = torch.zeros(n, width, dtype=wide, device=device)
    span_ids = torch.zeros(n, width, dtype=torch.long, device=device)
    ends = torch.full((n,), width, dtype=torch.long, device=device)  # completion length
    rows = torch.arange(n, device=device)
    span = torch.zeros(n, dtype=torch.long, device=device)
    count = torch.zeros(n, dtype=torch.long, device=device)
    for t in range(width):
        z = torch.empty(logits.shape, dtype=wide, device=device)
        for k in span.unique().tolist():  # each span's rows under that span's transform
            sel = span == k
            z[sel] = transform_logits(logits[sel], sp[k], allowed[k])
        tok, lp = Draw(rows.shape[0], generator, greedy)(z, None)
        tokens[rows, t], logps[rows, t], span_ids[rows, t] = tok, lp, span
        count += 1
        done_span = (count == length[span]) | (tok == close[span])
        span, count = span + done_span, count.masked_fill(done_span, 0)
        finished = span == len(spans)
        ends[rows[finished]] = t + 1
        if bool(finished.all()) or t == width - 1:
            break
        if bool(finished.any()):
            keep = (~finished).nonzero().squeeze(-1)
            rows, span, count, tok = rows[keep], span[keep], count[keep], tok[keep]
            dec.select(keep)
        logits = dec.step(tok)
    mask = (torch.arange(width, device=device)[None] < ends[:, None]).float()
    weights = torch.tensor([[s.loss_weight, s.kl_weight] for s in spans], device=device)
    span_ids = span_ids.masked_fill(mask == 0, 0)
    prompt_index = torch.arange(len(prompts), device=device).repeat_interleave(group_size)
    truncated = torch.zeros(n, dtype=torch.bool, device=device)
    truncated[rows[span != len(spans)]] = True  # rows still inside a span at the budget
    out = Rollout(
        prompts=prompts, group_size=group_size,
        completion_ids=tokens.masked_fill(mask == 0, params.pad_token_id), completion_mask=mask,
        sampling_logp=logps * mask, truncated=truncated, prompt_index=prompt_index,
        group_ids=prompt_index.clone(), span_ids=span_ids,
    )  # fmt: skip
    out.data["span_loss_weight"] = weights[span_ids, 0] * mask
    out.data["span_kl_weight"] = weights[span_ids, 1] * mask
    return out


def span_token_logprobs(
    logits: Tensor, rollout: Rollout, params: SamplingParams, spans: tuple[Span, ...],
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """(n, T, V) teacher-forced logits of the rollout's tokens -> (n, T) log-probs, each token
    under its span's transform (0 under mask == 0). Differentiable. Equal to the naive loop
    `log_softmax(transform_logits(logits[i, t], spans[span_ids[i, t]]))[token]`; entropies are
    those of each token's transformed distribution."""
    m = rollout.completion_mask.bool()
    wide = torch.promote_types(logits.dtype, torch.float32)  # fp32, or an fp64 model's fp64
    out = torch.zeros(m.shape, dtype=wide, device=logits.device)
    ent = torch.zeros_like(out) if with_entropy else None
    vocab = logits.shape[-1]
    for k, s in enumerate(spans):
        sel = m & (rollout.span_ids == k)
        if not bool(sel.any()):
            continue
        p = s.params(params)
        z = transform_logits(logits[sel], p, allowed_mask(p, vocab, logits.device))  # (M, V)
        logp = F.log_softmax(z, -1)  # (M, V)
        out = out.masked_scatter(sel, logp.gather(-1, rollout.completion_ids[sel][:, None])[:, 0])
        if ent is not None:
            probs = logp.exp()
            h = -torch.where(probs > 0, probs * logp, torch.zeros_like(logp)).sum(-1)
            ent = ent.masked_scatter(sel, h)
    return out, ent


def span_logprobs(
    model: Any, rollout: Rollout, params: SamplingParams, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Teacher-forced (n, T) log-probs (and entropies) of a typed-span rollout: one model pass
    (the prompt shared per group), then each token under its span's transform."""
    p = rollout.prompts
    logits = completion_outputs(
        model, p.input_ids, p.attention_mask, rollout.prompt_index, rollout.completion_ids,
        rollout.completion_mask, True, False,
    )  # fmt: skip
    return span_token_logprobs(logits, rollout, params, params.spans, with_entropy)
