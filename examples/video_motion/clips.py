"""Procedural clips of the AR video example: a coloured shape moving across a plain background.

A prompt is `"<colour> <shape> moves <direction>"` (4 colours × 2 shapes × 4 directions = 32
prompts). A clip is `frames` frames of `size`×`size` pixels: the shape (antialiased, 4×
supersampled) on a dark grey background moves `speed` whole pixels per frame in the prompted
direction, starting where it stays inside the frame; its position across the motion is random.

Held-out prompts: the 8 prompts of two colour-shape pairs (`HELDOUT`) are never seen by GRPO;
pre-training sees them all (the prior knows every prompt, only imperfectly).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

COLOURS = ("red", "green", "blue", "yellow")
RGB = ((0.95, 0.2, 0.15), (0.2, 0.85, 0.25), (0.25, 0.4, 1.0), (0.95, 0.85, 0.15))
SHAPES = ("ball", "square")
DIRECTIONS = ("left", "right", "up", "down")
STEP = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
BACKGROUND = (0.16, 0.16, 0.19)
CLIP = {"frames": 8, "size": 16, "radius": 2.5, "speed": 1}


def prompt(colour: int, shape: int, direction: int) -> str:
    return f"{COLOURS[colour]} {SHAPES[shape]} moves {DIRECTIONS[direction]}"


def parse_prompt(text: str) -> tuple[int, int, int]:
    """'red ball moves left' -> (colour, shape, direction) indices."""
    colour, shape, _, direction = text.split()
    return COLOURS.index(colour), SHAPES.index(shape), DIRECTIONS.index(direction)


HELDOUT = (("green", "square"), ("blue", "ball"))
"""Colour-shape pairs whose 4 prompts GRPO never sees (each colour and shape still appears in
GRPO training, in the other pair)."""


def is_heldout(colour: int, shape: int, direction: int) -> bool:
    """8 of the 32 prompts: every direction of the HELDOUT colour-shape pairs."""
    return (COLOURS[colour], SHAPES[shape]) in HELDOUT


def prompt_split() -> tuple[list[str], list[str]]:
    """(GRPO training prompts, held-out prompts)."""
    train, held = [], []
    for c in range(len(COLOURS)):
        for s in range(len(SHAPES)):
            for d in range(len(DIRECTIONS)):
                (held if is_heldout(c, s, d) else train).append(prompt(c, s, d))
    return train, held


def render(
    colour: Tensor,
    shape: Tensor,
    direction: Tensor,
    g: torch.Generator,
    frames: int = 8,
    size: int = 16,
    radius: float = 2.5,
    speed: int = 1,
) -> Tensor:
    """(N,) colour, shape and direction ids -> (N, frames, 3, size, size) clips in [0, 1].

    The shape's centre sits on pixel centres and moves a whole `speed` pixels per frame: a
    finite set of placements, so a small codebook codes every frame almost exactly."""
    n, ss = colour.shape[0], 4 * size
    travel = speed * (frames - 1)
    lo, hi = math.ceil(radius), size - 1 - math.ceil(radius)  # pixel indices of the centre
    if hi - lo < travel:
        raise ValueError(f"a {size}px frame cannot hold {travel}px of travel at radius {radius}")
    step = torch.tensor([STEP[d] for d in DIRECTIONS])[direction]  # (N, 2) px/frame, y down
    along = lo + torch.randint(0, hi - lo - travel + 1, (n,), generator=g)  # start, forward
    across = lo + torch.randint(0, hi - lo + 1, (n,), generator=g)
    sx, sy = step[:, 0], step[:, 1]
    start_x = torch.where(sx > 0, along, torch.where(sx < 0, size - 1 - along, across)) + 0.5
    start_y = torch.where(sy > 0, along, torch.where(sy < 0, size - 1 - along, across)) + 0.5
    t = torch.arange(frames, dtype=torch.float32)
    cx = (start_x[:, None] + sx[:, None] * speed * t)[..., None, None]  # (N, F, 1, 1)
    cy = (start_y[:, None] + sy[:, None] * speed * t)[..., None, None]
    ax = (torch.arange(ss) + 0.5) / 4  # supersampled pixel centres, in pixels
    dx, dy = ax.view(1, 1, 1, ss) - cx, ax.view(1, 1, ss, 1) - cy
    disc = dx**2 + dy**2 < radius**2
    box = (dx.abs() < 0.8 * radius) & (dy.abs() < 0.8 * radius)
    inside = torch.where((shape == 0)[:, None, None, None], disc, box).float()
    cover = inside.unflatten(-1, (size, 4)).unflatten(-3, (size, 4)).mean((-1, -3))
    fg = torch.tensor(RGB)[colour][:, None, :, None, None]  # (N, 1, 3, 1, 1)
    bg = torch.tensor(BACKGROUND)[None, None, :, None, None]
    a = cover[:, :, None]  # (N, F, 1, H, W)
    return bg * (1 - a) + fg * a


def make_clips(
    n: int, seed: int, mislabel: float = 0.0, prompts: list[str] | None = None, **clip: float
) -> dict[str, Tensor]:
    """n clips of random prompts (or of `prompts`, cycled) with their labels: `direction` is
    what the clip shows, `said` what its caption says. A `mislabel` fraction of captions name a
    random other direction (noisy captions: the prior learns to follow the prompt only weakly)."""
    g = torch.Generator().manual_seed(seed)
    if prompts is None:
        c = torch.randint(0, len(COLOURS), (n,), generator=g)
        s = torch.randint(0, len(SHAPES), (n,), generator=g)
        d = torch.randint(0, len(DIRECTIONS), (n,), generator=g)
    else:
        c, s, d = torch.tensor([parse_prompt(prompts[i % len(prompts)]) for i in range(n)]).T
    wrong = torch.rand(n, generator=g) < mislabel
    other = (d + torch.randint(1, len(DIRECTIONS), (n,), generator=g)) % len(DIRECTIONS)
    said = torch.where(wrong, other, d)
    clips = render(c, s, d, g, **{**CLIP, **clip})
    return {"clips": clips, "colour": c, "shape": s, "direction": d, "said": said}
