"""Credit assignment over multi-turn trajectories: per-turn rewards into token advantages."""

from __future__ import annotations

from einops import rearrange
from torch import Tensor


def returns_to_go(turn_reward: Tensor) -> Tensor:
    """(N, T) rewards at each turn's last token -> (N, T) sum of the rewards at or after each
    token: every token of turn k gets r_k + r_{k+1} + … (undiscounted)."""
    return turn_reward.flip(-1).cumsum(-1).flip(-1)


def per_turn_advantages(
    adv: Tensor,
    turn_reward: Tensor,
    group_size: int,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """(N,) trajectory advantages (the configured estimator over the final rewards), (N, T)
    per-turn rewards -> (N, T) token advantages A + (G_t - mean_g G_0) / (std_g G_0 + eps),
    G_t the return to go from token t's turn and G_0 = Σ_k r_k the trajectory's: a turn is
    credited with the turn rewards still to come, against its group's mean trajectory return
    (GRPO's baseline, arXiv 2402.03300 §4.1, applied per turn as in its process supervision
    variant §4.1.3). Tokens after the last reward get A - mean_g G_0 / (std_g G_0 + eps)."""
    g_t = returns_to_go(turn_reward)  # (N, T)
    g_0 = rearrange(turn_reward.sum(-1), "(p g) -> p g", g=group_size)
    mean = rearrange(g_0.mean(1, keepdim=True).expand_as(g_0), "p g -> (p g)")
    out = g_t - mean[:, None]
    if scale_by_std:
        std = g_0.std(1, keepdim=True).nan_to_num(0.0)  # a group of one has no spread
        std = rearrange(std.expand_as(g_0), "p g -> (p g)")
        out = out / (std[:, None] + eps)
    return adv[:, None] + out
