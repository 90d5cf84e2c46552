"""Per-token log-probs and entropies without materialising a (B, T, V) log-softmax.

Two entry points:
- `logprobs_and_entropy(logits, ids)`: from given logits. Rows are processed in chunks, each
  upcast to at least fp32; under autograd each chunk is checkpointed, so backward keeps only the
  input logits alive instead of one fp32 (rows, V) copy per chunk.
- `fused_head_logprobs(hidden, weight, ids)`: from the final hidden states through the LM head.
  The (B, T, V) logits never exist: each row chunk is projected, reduced to (log-prob, entropy)
  and dropped; backward recomputes the chunk's logits and writes the gradients of hidden, weight
  and bias directly (the approach of Liger-Kernel's fused linear losses, for per-token outputs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# ~64 MiB of fp32 per chunk for V = 49k; small enough to stay in cache-friendly territory.
DEFAULT_CHUNK_ELEMS = 1 << 24
# the fused head keeps ~2 fp32 (rows, V) buffers per chunk: 2 x 64 MiB (~341 rows at V = 49k).
# Its matmuls re-read the (V, H) weight once per chunk: at 85 rows (1 << 22) they ran ~1.3-1.7x
# slower per FLOP than at 341 rows (SmolLM2's head, 1 thread; benchmarks/README.md).
FUSED_CHUNK_ELEMS = 1 << 24


def _chunk_rows(n_rows: int, vocab: int, chunk_elems: int) -> int:
    """Rows per chunk: at most `chunk_elems // vocab`, spread evenly over the chunks that takes
    (4096 rows at a 341-row cap: 12 chunks of 316 and one of 304, not 12 of 341 and one of 4)."""
    cap = max(1, min(n_rows, chunk_elems // max(vocab, 1)))
    chunks = -(-n_rows // cap)
    return -(-n_rows // chunks) if n_rows else 1


# (rows, V) logits and the index of the chunk's first row -> transformed (rows, V) logits
Transform = Callable[[Tensor, int], Tensor]


def _logp_entropy_chunk(
    logits: Tensor,
    ids: Tensor,
    temperature: float,
    with_entropy: bool,
    transform: Transform | None = None,
    start: int = 0,
) -> tuple[Tensor, Tensor]:
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if transform is not None:
        z = transform(z, start)
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)  # (R,)
    logp = z.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - lse
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    # -Σ p·log p on centred values: lse - Σ p·z would cancel catastrophically for large logits
    logp_all = z - lse.unsqueeze(-1)
    p = torch.exp(logp_all)
    # -inf logits (filtered tokens) have p = 0 and must add 0, not 0 * -inf = nan; masking the
    # factor (not the product, as torch.where would) keeps the gradient finite too
    plogp = p * logp_all.masked_fill(p == 0, 0.0)
    return logp, -plogp.sum(-1)


def logprobs_and_entropy(
    logits: Tensor,
    ids: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = True,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    transform: Transform | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(..., V) logits, (...) ids -> log-probs (...) in at least fp32 and entropies (...) (None if not asked).

    Equal to `log_softmax(logits / temperature).gather(ids)` and `-(p * log p).sum(-1)`.
    `transform(chunk, first_row)` (e.g. top-p filtering) is applied to each flattened row chunk
    before the temperature, inside the checkpoint, so it never holds (B, T, V) either.
    """
    if logits.shape[:-1] != ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and ids {tuple(ids.shape)} disagree")
    lead, vocab = ids.shape, logits.shape[-1]
    flat_logits, flat_ids = logits.reshape(-1, vocab), ids.reshape(-1)
    rows = _chunk_rows(flat_ids.numel(), vocab, chunk_elems)
    use_ckpt = torch.is_grad_enabled() and logits.requires_grad and rows < flat_ids.numel()
    out_logp, out_ent = [], []
    for start in range(0, flat_ids.numel(), rows):
        args = (
            flat_logits[start : start + rows],
            flat_ids[start : start + rows],
            temperature,
            with_entropy,
            transform,
            start,
        )
        if use_ckpt:
            lp, ent = checkpoint(_logp_entropy_chunk, *args, use_reentrant=False)
        else:
            lp, ent = _logp_entropy_chunk(*args)
        out_logp.append(lp)
        out_ent.append(ent)
    logp = torch.cat(out_logp).reshape(lead)
    entropy = torch.cat(out_ent).reshape(lead) if with_entropy else None
    return logp, entropy


def selective_log_softmax(
    logits: Tensor, ids: Tensor, temperature: float = 1.0, chunk_elems: int = DEFAULT_CHUNK_ELEMS
) -> Tensor:
    """(B, T, V) logits, (B, T) ids -> (B, T) log-probs (at least fp32) of `ids` under softmax(logits / temperature)."""
    return logprobs_and_entropy(logits, ids, temperature, False, chunk_elems)[0]


def entropy_from_logits(
    logits: Tensor, temperature: float = 1.0, chunk_elems: int = DEFAULT_CHUNK_ELEMS
) -> Tensor:
    """(B, T, V) logits -> (B, T) entropy (at least fp32) of softmax(logits / temperature)."""
    ids = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    entropy = logprobs_and_entropy(logits, ids, temperature, True, chunk_elems)[1]
    assert entropy is not None  # with_entropy=True
    return entropy


# (rows, V) fp32 temperature-scaled logits and the chunk's first row -> the same logits with
# excluded tokens set to -inf (masking only: the gradient is the masked softmax's)
MaskFn = Callable[[Tensor, int], Tensor]


def _head_chunk(h: Tensor, weight: Tensor, bias: Tensor | None, scale: float) -> Tensor:
    """(R, H) hidden -> (R, V) fp32 logits / temperature, a fresh buffer that may be written."""
    z = h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())
    z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    return z.mul_(scale) if scale != 1.0 else z


class _FusedHeadLogprobs(torch.autograd.Function):
    """(R, H) hidden, (V, H) weight, (R,) ids -> (R,) log-probs and (R,) entropies."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, temperature, with_entropy, mask_fn, rows):  # type: ignore[override]
        n = hidden.shape[0]
        out_dtype = torch.promote_types(hidden.dtype, torch.float32)
        logp = torch.empty(n, dtype=out_dtype, device=hidden.device)
        lse = torch.empty_like(logp)
        ent = torch.zeros_like(logp)
        for s in range(0, n, rows):
            z = _head_chunk(hidden[s : s + rows], weight, bias, 1.0 / temperature)
            if mask_fn is not None:
                z = mask_fn(z, s)
            m = z.amax(-1, keepdim=True).clamp(min=torch.finfo(z.dtype).min)
            z.sub_(m)  # max 0: exp cannot overflow, the entropy sum cannot cancel
            e = torch.exp(z)
            tot = e.sum(-1)
            logp[s : s + rows] = z.gather(-1, ids[s : s + rows, None]).squeeze(-1) - tot.log()
            lse[s : s + rows] = m.squeeze(-1) + tot.log()
            if with_entropy:
                if mask_fn is not None:  # 0 * -inf on excluded tokens must add 0
                    z.clamp_(min=torch.finfo(z.dtype).min)
                # Σ e·z with torch's cascaded sum (a bmm loses ~1e-5 at V = 49k)
                dot = e.mul_(z).sum(-1)
                ent[s : s + rows] = tot.log() - dot / tot
        ctx.save_for_backward(hidden, weight, bias, ids, lse, ent)
        ctx.cfg = (temperature, mask_fn, rows)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):  # type: ignore[override]
        hidden, weight, bias, ids, lse, ent = ctx.saved_tensors
        temperature, mask_fn, rows = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)  # bf16 weights: fp32 accumulation
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None
        # d logp_i/dz = onehot_i - p ; dH/dz = -p·(log p + H) ; both through z = logits / T
        g1 = (g_logp if g_logp is not None else torch.zeros_like(lse)) / temperature
        g2 = None if g_ent is None or not g_ent.any() else g_ent / temperature
        for s in range(0, hidden.shape[0], rows):
            sl = slice(s, s + rows)
            h = hidden[sl]
            z = _head_chunk(h, weight, bias, 1.0 / temperature)
            if mask_fn is not None:
                z = mask_fn(z, s)
            z.sub_(lse[sl, None])  # log p
            p = torch.exp(z)
            if g2 is None:
                grad = p.mul_(-g1[sl, None])
            else:
                if mask_fn is not None:
                    z.masked_fill_(p == 0, 0.0)
                c = (g1[sl] + g2[sl] * ent[sl])[:, None]
                grad = torch.addcmul(c, z, g2[sl, None], out=z).mul_(p).neg_()
            grad.scatter_add_(1, ids[sl, None], g1[sl, None].to(grad.dtype))
            gw = grad.to(weight.dtype)
            if grad_h is not None:
                grad_h[sl] = gw @ weight
            if grad_w is not None:
                grad_w.addmm_(grad.t(), h.to(grad.dtype))
            if grad_b is not None:
                grad_b += grad.sum(0)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def fused_head_logprobs(
    hidden: Tensor,
    weight: Tensor,
    ids: Tensor,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    with_entropy: bool = True,
    mask_fn: MaskFn | None = None,
    chunk_elems: int = FUSED_CHUNK_ELEMS,
) -> tuple[Tensor, Tensor | None]:
    """(..., H) final hidden states, (V, H) LM-head weight, (...) ids -> log-probs (...) of `ids`
    under softmax((hidden @ weightᵀ + bias) / temperature) and entropies (...) (None if not asked),
    at least fp32, with no (..., V) tensor kept: equal to `lm_head -> log_softmax -> gather`.

    `mask_fn(z, first_row)` (top-k/top-p/min-p, allowed ranges) sees each flattened row chunk of
    temperature-scaled fp32 logits and may only set excluded tokens to -inf.
    """
    if hidden.shape[:-1] != ids.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and ids {tuple(ids.shape)} disagree")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"head weight {tuple(weight.shape)} does not map hidden size {hidden.shape[-1]}"
        )
    lead, vocab = ids.shape, weight.shape[0]
    flat_h, flat_ids = hidden.reshape(-1, hidden.shape[-1]), ids.reshape(-1)
    rows = _chunk_rows(flat_ids.numel(), vocab, chunk_elems)
    logp, ent = _FusedHeadLogprobs.apply(
        flat_h, weight, bias, flat_ids, temperature, with_entropy, mask_fn, rows
    )
    return logp.reshape(lead), ent.reshape(lead) if with_entropy else None
