"""Procedural "colour shape" images: the data of the AR image aesthetic example.

A prompt is two words, `"<colour> <shape>"` (6 colours × 5 shapes = 30 prompts). Each image draws
the shape in (a slightly jittered shade of) the colour, at a random position and size, antialiased
(4× supersampled), in one of four styles:
- vivid: the colour on a dark-to-mid neutral background;
- washed: blended 80 % towards light grey (low contrast, low saturation);
- dark: everything at 25 % brightness (under-exposed);
- grey: 90 % desaturated.
The styles are not in the prompt: a model trained on this data samples dull images most of the
time (`STYLE_PROBS`), which is the room the aesthetic reward has to improve.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

COLOURS = ("red", "yellow", "green", "cyan", "blue", "magenta")
HUES = (0.0, 60.0, 120.0, 180.0, 240.0, 300.0)  # degrees, one per colour
SHAPES = ("circle", "square", "triangle", "cross", "stripes")
STYLES = ("vivid", "washed", "dark", "grey")
STYLE_PROBS = (0.25, 0.25, 0.25, 0.25)
PROMPTS = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)


def is_heldout(colour: int, shape: int) -> bool:
    """10 of the 30 prompts never seen by GRPO (every colour and shape still appears in training)."""
    return (colour + shape) % 3 == 0


def prompt_split() -> tuple[list[str], list[str]]:
    """(GRPO training prompts, held-out prompts)."""
    train, held = [], []
    for c in range(len(COLOURS)):
        for s in range(len(SHAPES)):
            (held if is_heldout(c, s) else train).append(f"{COLOURS[c]} {SHAPES[s]}")
    return train, held


def parse_prompt(prompt: str) -> tuple[int, int]:
    """'red circle' -> (colour index, shape index)."""
    colour, shape = prompt.split()
    return COLOURS.index(colour), SHAPES.index(shape)


def hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """Hue in degrees, saturation and value in [0, 1], shape (N,) each -> (N, 3) RGB."""
    k = lambda n: (n + h / 60.0) % 6  # noqa: E731
    f = lambda n: v - v * s * torch.clamp(torch.minimum(k(n), 4 - k(n)), 0, 1)  # noqa: E731
    return torch.stack([f(5), f(3), f(1)], -1)


def shape_masks(shape: Tensor, size: int, g: torch.Generator) -> Tensor:
    """(N,) shape ids -> (N, size, size) coverage in [0, 1] with random centre/size/phase."""
    n, ss = shape.shape[0], 4 * size  # draw at 4x, average down (antialiasing)
    ax = (torch.arange(ss) + 0.5) / ss
    yy, xx = ax.view(1, ss, 1), ax.view(1, 1, ss)
    cx, cy = (torch.rand(2, n, 1, 1, generator=g) * 0.3 + 0.35).unbind(0)
    r = torch.rand(n, 1, 1, generator=g) * 0.12 + 0.22
    dx, dy = xx - cx, yy - cy
    period = 1.0 / (3 + torch.randint(0, 2, (n, 1, 1), generator=g))
    phase = torch.rand(n, 1, 1, generator=g) * period
    m = torch.zeros(n, ss, ss)
    for k in range(len(SHAPES)):  # only the masks that are used (memory: n·(4·size)² floats)
        i = (shape == k).nonzero().flatten()
        if len(i) == 0:
            continue
        x, y, rr, p, ph = dx[i], dy[i], r[i], period[i], phase[i]
        if k == 0:  # circle
            mk = x**2 + y**2 < rr**2
        elif k == 1:  # square
            mk = (x.abs() < 0.85 * rr) & (y.abs() < 0.85 * rr)
        elif k == 2:  # triangle, apex up
            mk = (y < 0.8 * rr) & (y > -rr) & (x.abs() < (y + rr) * 0.6)
        elif k == 3:  # cross
            mk = ((x.abs() < 0.35 * rr) & (y.abs() < 1.1 * rr)) | (
                (y.abs() < 0.35 * rr) & (x.abs() < 1.1 * rr)
            )
        else:  # vertical stripes over the whole image
            mk = ((xx + ph) % p < p / 2).expand(len(i), ss, ss)
        m[i] = mk.float()
    return F.avg_pool2d(m[:, None], 4)[:, 0]


def render(colour: Tensor, shape: Tensor, style: Tensor, size: int, g: torch.Generator) -> Tensor:
    """(N,) colour / shape / style ids -> (N, 3, size, size) float images in [0, 1]."""
    n = colour.shape[0]
    m = shape_masks(shape, size, g)[:, None]  # (N, 1, H, W)
    hue = torch.tensor(HUES)[colour] + (torch.rand(n, generator=g) - 0.5) * 16.0
    sat = 0.85 + 0.15 * torch.rand(n, generator=g)
    val = 0.85 + 0.15 * torch.rand(n, generator=g)
    fg = hsv_to_rgb(hue, sat, val)  # (N, 3)
    bg = (0.15 + 0.3 * torch.rand(n, 1, generator=g)).expand(n, 3)  # neutral grey background
    img = bg[:, :, None, None] * (1 - m) + fg[:, :, None, None] * m
    st = style.view(n, 1, 1, 1)
    washed = 0.2 * img + 0.8 * 0.6
    dark = 0.25 * img
    lum = img.mean(1, keepdim=True)
    grey_img = 0.1 * img + 0.9 * lum
    img = torch.where(st == 1, washed, img)
    img = torch.where(st == 2, dark, img)
    img = torch.where(st == 3, grey_img, img)
    return img.clamp(0, 1)


def make_images(
    n: int, seed: int, size: int = 16, prompts: list[str] | None = None
) -> dict[str, Tensor]:
    """n random images (prompts uniform over `prompts`, default all 30; styles by STYLE_PROBS):
    {"images" (n, 3, size, size) in [0, 1], "colour", "shape", "style" (n,) long}."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor([parse_prompt(p) for p in (prompts or PROMPTS)])
    pick = pool[torch.randint(0, len(pool), (n,), generator=g)]
    style = torch.multinomial(torch.tensor(STYLE_PROBS), n, replacement=True, generator=g)
    colour, shape = pick[:, 0], pick[:, 1]
    chunks = [
        render(colour[i : i + 2048], shape[i : i + 2048], style[i : i + 2048], size, g)
        for i in range(0, n, 2048)
    ]
    return {
        "images": torch.cat(chunks) if chunks else torch.zeros(0, 3, size, size),
        "colour": colour,
        "shape": shape,
        "style": style,
    }


def image_grid(rows: list[Tensor], scale: int = 4, pad: int = 2) -> Tensor:
    """Rows of (n, 3, H, W) images in [0, 1] -> one (H', W', 3) uint8 grid, nearest-upscaled."""
    cols = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[-2:]
    H, W = h * scale + pad, w * scale + pad
    out = torch.ones(3, len(rows) * H + pad, cols * W + pad)
    for i, r in enumerate(rows):
        up = F.interpolate(r.float(), scale_factor=scale, mode="nearest")
        for j in range(r.shape[0]):
            y, x = pad + i * H, pad + j * W
            out[:, y : y + h * scale, x : x + w * scale] = up[j]
    return (out.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)


__all__ = [
    "COLOURS",
    "PROMPTS",
    "SHAPES",
    "STYLES",
    "STYLE_PROBS",
    "hsv_to_rgb",
    "image_grid",
    "is_heldout",
    "make_images",
    "parse_prompt",
    "prompt_split",
    "render",
]
