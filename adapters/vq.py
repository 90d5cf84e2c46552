"""VQ tokenizers behind one interface, code grids in an LM vocabulary, and pixel conversions.

Shared by the image and video adapters. A `VQDecoder` maps code grids `(B, *grid)` (grid `(h, w)`
for an image, `(t, h, w)` for a clip) to pixels `(B, 3, H, W)` / `(B, T, 3, H, W)` and back.
A per-frame video decoder or a 3D tokenizer (Emu3 video, VidTok) is one more subclass with a
rank-3 grid; nothing else changes. A `CodeLayout` says where the codes sit in the LM's
vocabulary and validates LM tokens -> grid (wrong count or out-of-codebook id: a clear error,
never a clamp). diffusers and transformers are imported lazily.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from grpo_ar.core.registry import Registry


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
    `code_offset + i`. Emu3's EOL/EOF rows are a separate view (`with_row_ends`)."""

    grid: tuple[int, ...]
    """Codes per sample: (h, w) for an image, (t, h, w) for a clip."""
    code_offset: int
    """LM token id of code 0."""
    codebook_size: int
    """K: codes 0 .. K-1 are LM tokens code_offset .. code_offset + K - 1."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        if not self.grid or any(g < 1 for g in self.grid):
            raise ValueError(f"grid must be positive sizes such as (16, 16), got {self.grid}")
        if self.code_offset < 0 or self.codebook_size < 1:
            raise ValueError(
                f"need code_offset >= 0 and codebook_size >= 1, got {self.code_offset}, "
                f"{self.codebook_size}"
            )

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def code_range(self) -> tuple[int, int]:
        """Half-open LM token-id range of the codebook (for SamplingParams.allowed_ranges)."""
        return (self.code_offset, self.code_offset + self.codebook_size)

    def to_codes(self, ids: Tensor) -> Tensor:
        """(N, n) LM token ids -> (N, *grid) codes; refuses a wrong count or a non-code id."""
        if ids.ndim != 2 or ids.shape[1] != self.num_tokens:
            raise ValueError(
                f"got {tuple(ids.shape)} tokens; the grid {self.grid} needs (N, {self.num_tokens})"
            )
        lo, hi = self.code_range
        bad = (ids < lo) | (ids >= hi)
        if bad.any():
            raise ValueError(
                f"token id {int(ids[bad][0])} at {_where(bad)} is outside the codebook range "
                f"[{lo}, {hi}); sample with sampling.allowed_ranges=[[{lo}, {hi}]]"
            )
        return (ids - lo).reshape(ids.shape[0], *self.grid)

    def to_ids(self, codes: Tensor) -> Tensor:
        """(N, *grid) codes -> (N, n) LM token ids (raster order)."""
        check_codes(codes, self.codebook_size, self.grid)
        return codes.reshape(codes.shape[0], -1) + self.code_offset


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


# -- decoders -----------------------------------------------------------------------------------
class VQDecoder(ABC):
    """Codes (B, *grid) <-> pixels: (B, 3, H, W) for a rank-2 grid, (B, T, 3, H, W) for rank 3.

    Subclasses set `codebook_size`, `spatial_factor` (pixels per code), `temporal_factor`
    (frames per code slice) and `grid_ranks`, and implement `_decode` / `_encode`; `check_grid`
    adds shape limits (e.g. Janus decodes one square grid only). The wrapped model is frozen.
    """

    codebook_size: int
    spatial_factor: int
    temporal_factor: int = 1
    grid_ranks: tuple[int, ...] = (2,)
    pixel_range: tuple[float, float] = (-1.0, 1.0)

    def __init__(self, model: Any) -> None:
        self.model = model.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def check_grid(self, grid: Sequence[int]) -> None:
        """Raise a ValueError when this tokenizer cannot decode grids of this shape."""
        if len(grid) not in self.grid_ranks:
            kinds = {2: "(h, w) images", 3: "(t, h, w) clips"}
            can = " or ".join(kinds[r] for r in self.grid_ranks)
            raise ValueError(f"{type(self).__name__} decodes {can}, got grid {tuple(grid)}")

    def pixel_size(self, grid: Sequence[int]) -> tuple[int, ...]:
        """Pixel size of a decoded grid: (H, W), or (T, H, W) for a clip."""
        *t, h, w = grid
        return (
            *(n * self.temporal_factor for n in t),
            h * self.spatial_factor,
            w * self.spatial_factor,
        )

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """(B, *grid) long codes -> pixels in `pixel_range` (layout in the class docstring)."""
        self.check_grid(codes.shape[1:])
        check_codes(codes, self.codebook_size)
        return self._decode(codes.to(self.device, torch.long))

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """Pixels (B, 3, H, W) or (B, T, 3, H, W) in `pixel_range` -> (B, *grid) long codes."""
        return self._encode(pixels.to(self.device, self.dtype)).long()

    @abstractmethod
    def _decode(self, codes: Tensor) -> Tensor: ...

    @abstractmethod
    def _encode(self, pixels: Tensor) -> Tensor: ...


class DiffusersVQ(VQDecoder):
    """diffusers `VQModel` (either `lookup_from_codebook` setting); indices are flat (B·h·w,)."""

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        cfg = model.config
        self.codebook_size = int(cfg.num_vq_embeddings)
        self.spatial_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.channels = int(cfg.vq_embed_dim or cfg.latent_channels)

    def _decode(self, codes: Tensor) -> Tensor:
        b, h, w = codes.shape
        shape, flat = (b, h, w, self.channels), codes.reshape(-1)
        if self.model.config.lookup_from_codebook:
            return self.model.decode(flat, force_not_quantize=True, shape=shape).sample
        z_q = self.model.quantize.get_codebook_entry(flat, shape)
        return self.model.decode(z_q, force_not_quantize=True).sample

    def _encode(self, pixels: Tensor) -> Tensor:
        latents = self.model.encode(pixels).latents
        _, _, (_, _, idx) = self.model.quantize(latents)
        return idx.reshape(latents.shape[0], *latents.shape[2:])


class JanusVQ(VQDecoder):
    """transformers `JanusVQVAE`: decodes exactly one square grid (num_patches × num_patches)."""

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        cfg = model.config
        self.codebook_size = int(cfg.num_embeddings)
        self.spatial_factor = 2 ** (len(cfg.channel_multiplier) - 1)
        self.side = int(cfg.num_patches)

    def check_grid(self, grid: Sequence[int]) -> None:
        super().check_grid(grid)
        if tuple(grid) != (self.side, self.side):
            raise ValueError(
                f"JanusVQVAE decodes only its {self.side}×{self.side} grid "
                f"(config.num_patches), got {tuple(grid)}"
            )

    def _decode(self, codes: Tensor) -> Tensor:
        return self.model.decode(rearrange(codes, "b h w -> b (h w)"))

    def _encode(self, pixels: Tensor) -> Tensor:
        b, _, hh, ww = pixels.shape
        tokens = self.model.encode(pixels).image_tokens
        return tokens.reshape(b, hh // self.spatial_factor, ww // self.spatial_factor)


class Emu3VQ(VQDecoder):
    """transformers `Emu3VQVAE`: images (h, w) and clips (t, h, w); one code slice is
    `temporal_factor` (4) frames, so an image is encoded as 4 copies and decoded as frame 0."""

    grid_ranks = (2, 3)

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        cfg = model.config
        self.codebook_size = int(cfg.codebook_size)
        self.spatial_factor = 2 ** (len(cfg.channel_multiplier) - 1)
        self.temporal_factor = int(cfg.temporal_downsample_factor)

    def _decode(self, codes: Tensor) -> Tensor:
        return self.model.decode(codes)

    def _encode(self, pixels: Tensor) -> Tensor:
        if pixels.ndim == 5 and pixels.shape[1] % self.temporal_factor:
            raise ValueError(
                f"Emu3VQVAE encodes clips of a multiple of {self.temporal_factor} frames, "
                f"got {pixels.shape[1]}"
            )
        size = [list(pixels.shape[-2:])] * pixels.shape[0]
        return torch.stack(self.model.encode(pixels, image_sizes=size).image_tokens)


# -- loading by name ----------------------------------------------------------------------------
VQ_DECODERS = Registry("VQ decoder")


@VQ_DECODERS.register("diffusers_vq")
def _load_diffusers_vq(path: str, dtype: torch.dtype, **kw: Any) -> VQDecoder:
    from diffusers import VQModel

    return DiffusersVQ(VQModel.from_pretrained(path, torch_dtype=dtype, **kw))


@VQ_DECODERS.register("janus_vq")
def _load_janus_vq(path: str, dtype: torch.dtype, **kw: Any) -> VQDecoder:
    from transformers import JanusVQVAE

    return JanusVQ(JanusVQVAE.from_pretrained(path, dtype=dtype, **kw))


@VQ_DECODERS.register("emu3_vq")
def _load_emu3_vq(path: str, dtype: torch.dtype, **kw: Any) -> VQDecoder:
    from transformers import Emu3VQVAE

    return Emu3VQ(Emu3VQVAE.from_pretrained(path, dtype=dtype, **kw))


def load_vq_decoder(
    kind: str,
    path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **kw: Any,
) -> VQDecoder:
    """A saved VQ tokenizer by kind (`VQ_DECODERS`: diffusers_vq, janus_vq, emu3_vq); `kw` goes
    to `from_pretrained` (e.g. subfolder="vqvae")."""
    loader: Callable[..., VQDecoder] = VQ_DECODERS[kind]
    dec = loader(path, dtype, **kw)
    dec.model.to(device)
    return dec
