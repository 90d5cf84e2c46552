"""`prompt_fidelity`: the second reward of the image example's ensemble.

The probability that an image shows its prompt's colour and shape, p(colour) · p(shape), under
the reward classifier of pretrain.py (`reward_classifier.safetensors`). That network is not the
held-out judge (`classifier.safetensors`): it was trained on other images, from another seed,
of the GRPO training prompts only, so GRPO pushing on it does not push on the judge's own
weights, and the judge's fidelity stays a measurement rather than the objective.

config.toml puts it next to the aesthetic reward; per entry it reads the row's `colour` and
`shape` indices, run-level it needs `path` (run.py passes the cached file):

    [data]
    rewards = [
      { name = "aesthetic_proxy" },
      { name = "prompt_fidelity", weight = 1.0, args = { colour = "$colour", shape = "$shape" } },
    ]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ (see run.py)
from image_aesthetic.pretrain import ShapeClassifier  # noqa: E402
from image_aesthetic.shapes import COLOURS, SHAPES  # noqa: E402

from grpo_ar.rewards.base import RewardContext, register_reward  # noqa: E402
from grpo_ar.rewards.pixels import images_to_tensor  # noqa: E402


@register_reward("prompt_fidelity", required=("colour", "shape"), defaults={})
class PromptFidelity:
    """p(colour) · p(shape) of each image under a ShapeClassifier loaded from `path`."""

    def __init__(self, path: str) -> None:
        from safetensors.torch import load_file

        self.net = ShapeClassifier()
        self.net.load_state_dict(load_file(path))
        self.net.eval().requires_grad_(False)

    def check_args(self, args: dict[str, Any]) -> None:
        for key, n in (("colour", len(COLOURS)), ("shape", len(SHAPES))):
            v = args.get(key)
            if not isinstance(v, int) or not 0 <= v < n:
                raise ValueError(f"{key}={v!r}: need an index in [0, {n}) ({key} of the prompt)")

    @torch.no_grad()
    def __call__(self, outputs: list[Any], args: list[dict], ctx: RewardContext) -> Tensor:
        x = images_to_tensor(outputs)  # (N, 3, H, W) in [0, 1]
        colour, shape = self.net(x)  # (N, 6), (N, 5) logits
        c = torch.tensor([a["colour"] for a in args])
        s = torch.tensor([a["shape"] for a in args])
        rows = torch.arange(len(args))
        return colour.softmax(-1)[rows, c] * shape.softmax(-1)[rows, s]  # (N,)


__all__ = ["PromptFidelity"]
