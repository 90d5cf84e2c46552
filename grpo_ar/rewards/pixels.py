"""Decoded images as tensors for rewards: PIL images, uint8 `(H, W, 3)` arrays/tensors or float
`(3, H, W)` tensors in [0, 1] -> one `(B, 3, H, W)` float batch (video rewards reuse it per
frame), and `map_images` over same-size chunks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor


def image_to_tensor(output: Any) -> Tensor:
    """One image -> (3, H, W) float32 in [0, 1]: PIL (any mode), uint8 (H, W, 3), float (3, H, W)."""
    if type(output).__module__.startswith("PIL."):
        output = np.asarray(output.convert("RGB"))
    x = torch.from_numpy(np.array(output)) if isinstance(output, np.ndarray) else output
    if not isinstance(x, Tensor):
        raise TypeError(f"expected an image (PIL, array or tensor), got {type(output).__name__}")
    if x.dtype == torch.uint8:
        if x.ndim != 3 or x.shape[-1] != 3:
            raise ValueError(f"a uint8 image must be (H, W, 3), got {tuple(x.shape)}")
        return x.permute(2, 0, 1).float() / 255
    if not x.is_floating_point() or x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(
            f"a float image must be (3, H, W) in [0, 1], got {x.dtype} {tuple(x.shape)}; "
            "uint8 images are (H, W, 3)"
        )
    return x.detach().float().clamp(0, 1)  # decoders overshoot a little; PIL would clip too


def images_to_tensor(outputs: Sequence[Any] | Tensor) -> Tensor:
    """Images of one size -> (B, 3, H, W) float32 in [0, 1] (see `image_to_tensor`)."""
    if isinstance(outputs, Tensor) and outputs.ndim == 4 and outputs.is_floating_point():
        return outputs.detach().float().clamp(0, 1)
    xs = [image_to_tensor(o) for o in outputs]
    sizes = sorted({tuple(x.shape[1:]) for x in xs})
    if len(sizes) > 1:
        raise ValueError(f"images differ in size {sizes}; resize them or use `map_images`")
    return torch.stack(xs) if xs else torch.zeros(0, 3, 1, 1)


def map_images(
    fn: Callable[[Tensor, list[int]], Tensor],
    outputs: Sequence[Any],
    batch_size: int = 64,
    to_tensor: Callable[[Any], Tensor] = image_to_tensor,
) -> Tensor:
    """`fn(x (b, 3, H, W), idx) -> (b, ...)` over same-size chunks of <= batch_size; (N, ...).
    `to_tensor` converts one output (video rewards pass clips -> (F, 3, H, W))."""
    xs = [to_tensor(o) for o in outputs]
    if not xs:
        return torch.zeros(0)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault(tuple(x.shape), []).append(i)
    order, parts = [], []
    for idx in groups.values():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            parts.append(fn(torch.stack([xs[i] for i in chunk]), chunk))
            order += chunk
    out = torch.cat(parts)
    return out[torch.argsort(torch.tensor(order))]
