"""The token-level core: pure torch functions on (N, T) tensors, looked up by paper name."""

from .advantages import ADVANTAGES, MULTI_OBJECTIVE, check_advantages, compute_advantages
from .aggregation import AGGREGATIONS
from .kl import KL
from .logprobs import entropy_from_logits, logprobs_and_entropy, selective_log_softmax
from .losses import LOSSES, PolicyLoss
from .registry import Registry, UnknownNameError
from .tree_advantages import treepo  # noqa: F401  (registers "treepo")

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "KL",
    "LOSSES",
    "MULTI_OBJECTIVE",
    "PolicyLoss",
    "Registry",
    "UnknownNameError",
    "check_advantages",
    "compute_advantages",
    "entropy_from_logits",
    "logprobs_and_entropy",
    "selective_log_softmax",
]
