"""Code grids in an LM vocabulary and pixel conversions, shared by the image and video adapters.

A `CodeLayout` says where the codes sit in the LM sequence (code ids, and Emu3's EOL/EOF layout
tokens at their positions) and validates LM tokens -> grid (wrong count, misplaced layout token
or out-of-codebook id: a clear error, never a clamp). `to_unit` / `to_uint8` / `to_pil` convert
decoder pixels into what rewards read. The tokenizers themselves are in `adapters/vq.py`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import Tensor


def _where(bad: Tensor) -> str:
    """'sample i, position j' of the first True in a (B, ...) bool tensor (error paths only)."""
    first = bad.reshape(bad.shape[0], -1).nonzero()[0].tolist()
    return f"sample {first[0]}, position {first[1]}"


def check_codes(codes: Tensor, codebook_size: int, grid: Sequence[int] | None = None) -> None:
    """Raise a ValueError unless `codes` (B, *grid) are integer ids in [0, codebook_size)."""
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if grid is not None and tuple(codes.shape[1:]) != tuple(grid):
        raise ValueError(f"code grid {tuple(codes.shape[1:])} != the expected grid {tuple(grid)}")
    bad = (codes < 0) | (codes >= codebook_size)
    if bad.any():
        value = int(codes.reshape(codes.shape[0], -1)[bad.reshape(codes.shape[0], -1)][0])
        raise ValueError(
            f"code {value} at {_where(bad)} is outside the codebook [0, {codebook_size})"
        )


@dataclass(frozen=True)
class CodeLayout:
    """A code grid in an LM sequence: raster order (t, h, w), code i is LM token
    `code_offset + i`; optionally Emu3's layout tokens: `eol` after every row of w codes, `eof`
    after every (h, w) slice (the image, or each code slice of a clip). Without them the sequence
    is the codes alone (LlamaGen's layout)."""

    grid: tuple[int, ...]
    """Codes per sample: (h, w) for an image, (t, h, w) for a clip."""
    code_offset: int
    """LM token id of code 0."""
    codebook_size: int
    """K: codes 0 .. K-1 are LM tokens code_offset .. code_offset + K - 1."""
    eol: int | None = None
    """LM token ending every row of codes (Emu3: `<|extra_200|>`), or None."""
    eof: int | None = None
    """LM token ending every (h, w) slice (Emu3: `<|extra_201|>`), or None."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        if not self.grid or any(g < 1 for g in self.grid):
            raise ValueError(f"grid must be positive sizes such as (16, 16), got {self.grid}")
        if self.code_offset < 0 or self.codebook_size < 1:
            raise ValueError(
                f"need code_offset >= 0 and codebook_size >= 1, got {self.code_offset}, "
                f"{self.codebook_size}"
            )
        lo, hi = self.code_range
        for name, tok in (("eol", self.eol), ("eof", self.eof)):
            if tok is not None and (tok < 0 or lo <= tok < hi):
                raise ValueError(
                    f"{name} token {tok} must be a token id >= 0 outside the codebook [{lo}, {hi})"
                )

    @property
    def num_codes(self) -> int:
        """Codes per sample (the product of the grid)."""
        return math.prod(self.grid)

    @property
    def num_tokens(self) -> int:
        """LM tokens per sample: the codes plus the layout tokens."""
        return self.template.shape[0]

    @property
    def code_range(self) -> tuple[int, int]:
        """Half-open LM token-id range of the codebook (for SamplingParams.allowed_ranges)."""
        return (self.code_offset, self.code_offset + self.codebook_size)

    @functools.cached_property
    def template(self) -> Tensor:
        """(num_tokens,) long: the layout token at each position, -1 where a code goes."""
        *lead, h, w = self.grid
        row = [-1] * w + ([self.eol] if self.eol is not None else [])
        piece = row * h + ([self.eof] if self.eof is not None else [])
        return torch.tensor(piece * math.prod(lead), dtype=torch.long)

    @functools.cached_property
    def code_positions(self) -> Tensor:
        """(num_codes,) long: the sequence position of each code, raster order."""
        return (self.template < 0).nonzero().squeeze(-1)

    @property
    def position_ranges(self) -> tuple[tuple[int, int, int], ...]:
        """The layout tokens forced at their positions (SamplingParams.position_ranges)."""
        pos = (self.template >= 0).nonzero().squeeze(-1).tolist()
        return tuple((t, int(self.template[t]), int(self.template[t]) + 1) for t in pos)

    def to_codes(self, ids: Tensor) -> Tensor:
        """(N, n) LM token ids -> (N, *grid) codes; refuses a wrong count, a layout token out of
        place or a non-code id where a code belongs."""
        if ids.ndim != 2 or ids.shape[1] != self.num_tokens:
            extra = " (codes and EOL/EOF)" if self.num_tokens != self.num_codes else ""
            raise ValueError(
                f"got {tuple(ids.shape)} tokens; the grid {self.grid} needs "
                f"(N, {self.num_tokens}){extra}"
            )
        template = self.template.to(ids.device)
        fixed = template >= 0
        wrong = fixed & (ids != template)
        if wrong.any():
            i, t = wrong.nonzero()[0].tolist()
            name = "EOL" if int(template[t]) == self.eol else "EOF"
            raise ValueError(
                f"expected the {name} token {int(template[t])} at sample {i}, position {t}, got "
                f"{int(ids[i, t])}; sample with the adapter's sampling.position_ranges"
            )
        lo, hi = self.code_range
        bad = ~fixed & ((ids < lo) | (ids >= hi))
        if bad.any():
            raise ValueError(
                f"token id {int(ids[bad][0])} at {_where(bad)} is outside the codebook range "
                f"[{lo}, {hi}); sample with sampling.allowed_ranges=[[{lo}, {hi}]]"
            )
        codes = ids[:, self.code_positions.to(ids.device)] if fixed.any() else ids
        return (codes - lo).reshape(ids.shape[0], *self.grid)

    def to_ids(self, codes: Tensor) -> Tensor:
        """(N, *grid) codes -> (N, n) LM token ids (raster order, layout tokens in place)."""
        check_codes(codes, self.codebook_size, self.grid)
        flat = codes.reshape(codes.shape[0], -1) + self.code_offset
        if self.num_tokens == self.num_codes:
            return flat
        out = self.template.to(codes.device).repeat(codes.shape[0], 1)
        out[:, self.code_positions.to(codes.device)] = flat
        return out


def with_row_ends(ids: Tensor, width: int, eol: int, eof: int | None = None) -> Tensor:
    """(N, rows·width) -> (N, rows·(width + 1) [+ 1]): EOL after every row, then EOF (Emu3's LM
    layout; `decode_image_tokens` of `Emu3ForConditionalGeneration` reads it)."""
    rows = rearrange(ids, "n (r w) -> n r w", w=width)
    rows = torch.cat([rows, torch.full_like(rows[..., :1], eol)], -1)
    out = rows.reshape(ids.shape[0], -1)
    return out if eof is None else torch.cat([out, torch.full_like(out[:, :1], eof)], 1)


def strip_row_ends(ids: Tensor, width: int, eol: int, eof: int | None = None) -> Tensor:
    """Inverse of `with_row_ends`; refuses EOL/EOF anywhere but at row ends / the end."""
    if eof is not None:
        if (ids[:, -1] != eof).any():
            raise ValueError(f"expected EOF token {eof} at the end of every sequence")
        ids = ids[:, :-1]
    if ids.shape[1] % (width + 1):
        raise ValueError(f"{ids.shape[1]} tokens are not whole rows of {width} codes + EOL")
    rows = rearrange(ids, "n (r w) -> n r w", w=width + 1)
    if (rows[..., -1] != eol).any() or (rows[..., :-1] == eol).any():
        raise ValueError(f"EOL token {eol} must end every row of {width} codes, and only there")
    return rows[..., :-1].reshape(ids.shape[0], -1)


# -- pixels -------------------------------------------------------------------------------------
def to_unit(pixels: Tensor, pixel_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Decoder pixels in `pixel_range` -> float32 in [0, 1] (clamped: random decoders overshoot)."""
    lo, hi = pixel_range
    return ((pixels.float() - lo) / (hi - lo)).clamp(0.0, 1.0)


def to_uint8(unit: Tensor) -> Tensor:
    """(..., 3, H, W) floats in [0, 1] -> (..., H, W, 3) uint8 (frames layout)."""
    return (unit * 255.0).round().to(torch.uint8).movedim(-3, -1).contiguous()


def to_pil(images: Tensor) -> list[Any]:
    """(N, H, W, 3) uint8 -> N PIL images."""
    from PIL import Image

    return [Image.fromarray(x) for x in images.cpu().numpy()]
