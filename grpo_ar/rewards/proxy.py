"""`aesthetic_proxy`: a hand-made PROXY (colour, contrast, saturation, sharpness, exposure
statistics), not a learned aesthetic model: it lets examples run without weights."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import RewardContext, register_reward
from .pixels import map_images

# ---------------------------------------------------------------- aesthetic_proxy (no weights)

LUMA = (0.299, 0.587, 0.114)  # Rec. 601
PROXY_COMPONENTS = ("colourfulness", "contrast", "saturation", "sharpness", "exposure")


def proxy_components(x: Tensor) -> Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 5) statistics mapped to [0, 1], in `PROXY_COMPONENTS` order.

    colourfulness: Hasler & Süsstrunk 2003 M (0-255 units), 1 - exp(-M / 45) (45 = "averagely
      colourful" on their scale -> 0.63);
    contrast: RMS contrast c = std of luma, exp(-((c - 0.22) / 0.12)^2) (natural-image range);
    saturation: mean HSV saturation s, exp(-((s - 0.45) / 0.25)^2) (grey and neon both score low);
    sharpness: std L of the 4-neighbour Laplacian of luma (Pech-Pacheco 2000), a log-normal bell
      exp(-(log10(L / 0.08) / 0.6)^2): crisp edges score high, blur (L -> 0) and pixel noise
      (L ~ 0.9 for uniform noise) low; L = 0.04 (variance 100 on 0-255, the usual blur cut) -> 0.78;
    exposure: mean luma m, exp(-((m - 0.5) / 0.25)^2).
    Per-image statistics only, so a score never depends on its batch-mates.
    """
    if x.ndim != 4 or x.shape[1] != 3 or min(x.shape[-2:]) < 3:
        raise ValueError(f"need (B, 3, H, W) images of at least 3x3, got {tuple(x.shape)}")
    r, g, b = x.double().unbind(1)  # (B, H, W) each
    rg, yb = 255 * (r - g), 255 * (0.5 * (r + g) - b)
    sd = lambda t: t.flatten(1).std(1, correction=0)  # noqa: E731
    mu = lambda t: t.flatten(1).mean(1)  # noqa: E731
    colour = torch.hypot(sd(rg), sd(yb)) + 0.3 * torch.hypot(mu(rg), mu(yb))
    y = LUMA[0] * r + LUMA[1] * g + LUMA[2] * b
    hi, lo = x.double().amax(1), x.double().amin(1)
    sat = torch.where(hi > 0, (hi - lo) / hi.clamp_min(1e-12), torch.zeros_like(hi))
    lap = y[:, 1:-1, :-2] + y[:, 1:-1, 2:] + y[:, :-2, 1:-1] + y[:, 2:, 1:-1] - 4 * y[:, 1:-1, 1:-1]
    bell = lambda v, c, w: torch.exp(-(((v - c) / w) ** 2))  # noqa: E731
    comps = [
        1 - torch.exp(-colour / 45),
        bell(sd(y), 0.22, 0.12),
        bell(mu(sat), 0.45, 0.25),
        bell(torch.log10(sd(lap) / 0.08), 0.0, 0.6),
        bell(mu(y), 0.5, 0.25),
    ]
    return torch.stack(comps, 1).float()


def aesthetic_proxy_score(x: Tensor, weights: Tensor) -> Tensor:
    """(B, 3, H, W), weights (K,) or (B, K) >= 0 -> (B,) weighted mean of `proxy_components`."""
    comps = proxy_components(x)
    w = weights.to(comps).expand_as(comps)
    return (comps * w).sum(1) / w.sum(1)


PROXY_WEIGHTS = dict.fromkeys(PROXY_COMPONENTS, 1.0)


def _check_proxy(args: Mapping[str, Any]) -> None:
    w = {**PROXY_WEIGHTS, **args}
    for k in PROXY_COMPONENTS:
        ok = isinstance(w[k], numbers.Real) and not isinstance(w[k], bool)
        if not (ok and math.isfinite(w[k]) and w[k] >= 0):
            raise ValueError(f"weight {k}={w[k]!r} must be a finite number >= 0")
    if sum(w[k] for k in PROXY_COMPONENTS) <= 0:
        raise ValueError(f"at least one of {', '.join(PROXY_COMPONENTS)} needs a weight > 0")


@register_reward("aesthetic_proxy", defaults=PROXY_WEIGHTS, check=_check_proxy)
@torch.no_grad()
def aesthetic_proxy(outputs: list[Any], args: list[dict], ctx: RewardContext) -> Tensor:
    """PROXY aesthetic score in [0, 1], training-free (see `proxy_components`); the args weight
    the five statistics (default all 1). Not a learned aesthetic model: easy to game."""
    w = torch.tensor([[float(a.get(k, PROXY_WEIGHTS[k])) for k in PROXY_COMPONENTS] for a in args])
    return map_images(lambda x, idx: aesthetic_proxy_score(x, w[idx]), outputs)
