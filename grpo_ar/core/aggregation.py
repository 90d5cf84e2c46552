"""Token losses (N, T) -> scalar. Normalisers are global counts passed in, so any split of a
batch into micro-batches or data-parallel shards sums to the full-batch loss and gradient.

Signature: `fn(loss_tok, mask, total_tokens, total_seqs, max_len)`:
- `total_tokens`: completion tokens (mask sum) in the whole optimizer-step batch;
- `total_seqs`: sequences in that batch;
- `max_len`: the constant completion budget (max_new_tokens) for Dr. GRPO.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from torch import Tensor

from .registry import Registry


class BatchTotals(NamedTuple):
    """The global normalisers of one optimizer step, the last three aggregation arguments."""

    tokens: Tensor | float  # completion tokens (loss-mask sum) over all micro-batches and ranks
    seqs: int  # sequences over all micro-batches and ranks
    max_len: int  # max_new_tokens


class AggregationFn(Protocol):
    """The signature every `AGGREGATIONS` entry shares."""

    def __call__(
        self,
        loss_tok: Tensor,  # (N, T) per-token loss of this micro-batch
        mask: Tensor,  # (N, T) 1 on the tokens that count
        total_tokens: Tensor | float,  # completion tokens of the whole optimizer-step batch
        total_seqs: float,  # sequences of that batch
        max_len: int,  # the completion budget (max_new_tokens), Dr. GRPO's constant
        /,
    ) -> Tensor: ...


AGGREGATIONS: Registry[AggregationFn] = Registry("loss aggregation")


def _masked(loss_tok: Tensor, mask: Tensor) -> Tensor:
    # where, not multiply: a NaN or inf under mask == 0 must not leak into the sum
    m = mask.bool().expand_as(loss_tok)
    return loss_tok.masked_fill(~m, 0.0)


@AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(
    loss_tok: Tensor, mask: Tensor, total_tokens: Tensor | float, total_seqs: float, max_len: int
) -> Tensor:
    """Mean over sequences of each sequence's token mean: the original GRPO (arXiv 2402.03300 eq. 3)."""
    per_seq = _masked(loss_tok, mask).sum(-1) / mask.sum(-1).clamp(min=1).to(loss_tok.dtype)
    return per_seq.sum() / max(total_seqs, 1)


@AGGREGATIONS.register("token_mean")
def token_mean(
    loss_tok: Tensor, mask: Tensor, total_tokens: Tensor | float, total_seqs: float, max_len: int
) -> Tensor:
    """Sum over all tokens / global token count: DAPO (arXiv 2503.14476 eq. 8), TRL's `dapo`."""
    return _masked(loss_tok, mask).sum() / max(total_tokens, 1)


@AGGREGATIONS.register("seq_mean_token_sum")
def seq_mean_token_sum(
    loss_tok: Tensor, mask: Tensor, total_tokens: Tensor | float, total_seqs: float, max_len: int
) -> Tensor:
    """Mean over sequences of each sequence's token sum: verl's `seq-mean-token-sum`; with
    sequence-level ratios it is TRL's `luspo` reduction (LUSPO arXiv 2602.05261)."""
    return _masked(loss_tok, mask).sum() / max(total_seqs, 1)


@AGGREGATIONS.register("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(
    loss_tok: Tensor, mask: Tensor, total_tokens: Tensor | float, total_seqs: float, max_len: int
) -> Tensor:
    """Sum over all tokens / (sequences · max_len), a constant normaliser: Dr. GRPO (arXiv 2503.20783)."""
    return _masked(loss_tok, mask).sum() / (max(total_seqs, 1) * max_len)
