"""Image rewards: `aesthetic_laion` and `clip_score` (CLIP, local weights), `aesthetic_proxy`.

Outputs may be PIL images, uint8 `(H, W, 3)` arrays/tensors or float `(3, H, W)` tensors in [0, 1];
`images_to_tensor` turns them into one `(B, 3, H, W)` float batch (video rewards reuse it per
frame). Every scorer runs batched under no-grad. transformers is imported only when a CLIP reward
is built. `aesthetic_proxy` is a hand-made PROXY (colour, contrast, saturation, sharpness,
exposure statistics), not a learned aesthetic model: it lets examples run without weights.

The code is split by concern: `pixels` (outputs -> tensors), `proxy` (`aesthetic_proxy`) and
`clip` (`aesthetic_laion`, `clip_score`); this module keeps every name importing from here.
"""

from __future__ import annotations

from .clip import (
    LAION_MLP_KEYS,
    ClipPreprocess,
    ClipReward,
    ClipScore,
    LaionAesthetic,
    LaionAestheticMLP,
    caption,
    load_clip,
    load_laion_mlp,
)
from .pixels import image_to_tensor, images_to_tensor, map_images
from .proxy import (
    PROXY_COMPONENTS,
    PROXY_WEIGHTS,
    aesthetic_proxy,
    aesthetic_proxy_score,
    proxy_components,
)

__all__ = [
    "LAION_MLP_KEYS",
    "PROXY_COMPONENTS",
    "PROXY_WEIGHTS",
    "ClipPreprocess",
    "ClipReward",
    "ClipScore",
    "LaionAesthetic",
    "LaionAestheticMLP",
    "aesthetic_proxy",
    "aesthetic_proxy_score",
    "caption",
    "image_to_tensor",
    "images_to_tensor",
    "load_clip",
    "load_laion_mlp",
    "map_images",
    "proxy_components",
]
