"""Per-token log-probs and entropies without materialising a (B, T, V) log-softmax.

Rows are processed in chunks: each chunk upcasts to at least fp32, so bf16 logits give fp32-accurate
results. Under autograd each chunk is checkpointed, so backward keeps only the input logits
alive instead of one fp32 (rows, V) copy per chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# ~64 MiB of fp32 per chunk for V = 49k; small enough to stay in cache-friendly territory.
DEFAULT_CHUNK_ELEMS = 1 << 24


def _chunk_rows(n_rows: int, vocab: int, chunk_elems: int) -> int:
    return max(1, min(n_rows, chunk_elems // max(vocab, 1)))


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
    # -inf logits (filtered tokens) have p = 0 and must add 0, not 0 * -inf = nan
    plogp = torch.where(p > 0, p * logp_all, torch.zeros_like(z))
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
        args = (flat_logits[start : start + rows], flat_ids[start : start + rows])
        extra = (temperature, with_entropy, transform, start)
        if use_ckpt:
            lp, ent = checkpoint(_logp_entropy_chunk, *args, *extra, use_reentrant=False)
        else:
            lp, ent = _logp_entropy_chunk(*args, *extra)
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
    return logprobs_and_entropy(logits, ids, temperature, True, chunk_elems)[1]
