"""VQ tokenizers behind one interface, loaded by name (`VQ_DECODERS`, `load_vq_decoder`).

Shared by the image and video adapters. A `VQDecoder` maps code grids `(B, *grid)` (grid `(h, w)`
for an image, `(t, h, w)` for a clip) to pixels `(B, 3, H, W)` / `(B, T, 3, H, W)` and back:
diffusers `VQModel`, `JanusVQVAE` and `Emu3VQVAE` for images; for clips any image decoder frame by
frame (`PerFrameVQ`), `Emu3VQVAE` (4 frames per code slice) and diffusers `AutoencoderVidTok`
(FSQ, causal: 1 + 4·(t − 1) frames). `grid_for` maps a pixel size to its code grid and refuses
sizes and frame counts a tokenizer cannot take. Where codes sit in the LM sequence and the pixel
conversions are in `adapters/codes.py` (re-exported here, their historical home).
diffusers and transformers are imported lazily.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

from grpo_ar.core.registry import Registry

from .codes import (
    CodeLayout,
    check_codes,
    strip_row_ends,
    to_pil,
    to_uint8,
    to_unit,
    with_row_ends,
)

__all__ = [
    "VQ_DECODERS",
    "CodeLayout",
    "DiffusersVQ",
    "Emu3VQ",
    "JanusVQ",
    "PerFrameVQ",
    "VQDecoder",
    "VidTokVQ",
    "check_codes",
    "load_vq_decoder",
    "strip_row_ends",
    "to_pil",
    "to_uint8",
    "to_unit",
    "with_row_ends",
]


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
        """Where the tokenizer's weights are."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The tokenizer's parameter dtype."""
        return next(self.model.parameters()).dtype

    def check_grid(self, grid: Sequence[int]) -> None:
        """Raise a ValueError when this tokenizer cannot decode grids of this shape."""
        if len(grid) not in self.grid_ranks:
            kinds = {2: "(h, w) images", 3: "(t, h, w) clips"}
            can = " or ".join(kinds[r] for r in self.grid_ranks)
            raise ValueError(f"{type(self).__name__} decodes {can}, got grid {tuple(grid)}")

    def frames(self, slices: int) -> int:
        """Frames decoded from `slices` code slices."""
        return slices * self.temporal_factor

    def slices(self, frames: int) -> int:
        """Code slices of a clip of `frames` frames; refuses a count the tokenizer cannot take."""
        if frames < 1 or frames % self.temporal_factor:
            raise ValueError(
                f"{type(self).__name__} takes clips of a multiple of {self.temporal_factor} "
                f"frames, got {frames}"
            )
        return frames // self.temporal_factor

    def pixel_size(self, grid: Sequence[int]) -> tuple[int, ...]:
        """Pixel size of a decoded grid: (H, W), or (T, H, W) for a clip."""
        *t, h, w = grid
        return (*(self.frames(n) for n in t), h * self.spatial_factor, w * self.spatial_factor)

    def grid_for(self, size: Sequence[int]) -> tuple[int, ...]:
        """Code grid of pixels of `size` (H, W) or (T, H, W); refuses a size or frame count
        this tokenizer cannot take (never rounds)."""
        *t, hh, ww = (int(x) for x in size)
        f = self.spatial_factor
        if hh % f or ww % f or min(hh, ww) < 1:
            raise ValueError(
                f"{type(self).__name__} takes frames whose height and width are multiples of "
                f"{f}, got {hh}×{ww}"
            )
        grid = (*(self.slices(n) for n in t), hh // f, ww // f)
        self.check_grid(grid)
        return grid

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """(B, *grid) long codes -> pixels in `pixel_range` (layout in the class docstring)."""
        self.check_grid(codes.shape[1:])
        check_codes(codes, self.codebook_size)
        return self._decode(codes.to(self.device, torch.long))

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """Pixels (B, 3, H, W) or (B, T, 3, H, W) in `pixel_range` -> (B, *grid) long codes."""
        if pixels.ndim not in (4, 5) or pixels.shape[-3] != 3:
            raise ValueError(
                f"pixels must be (B, 3, H, W) images or (B, T, 3, H, W) clips, got "
                f"{tuple(pixels.shape)}"
            )
        grid = self.grid_for((*pixels.shape[1:-3], *pixels.shape[-2:]))
        codes = self._encode(pixels.to(self.device, self.dtype)).long()
        if tuple(codes.shape[1:]) != grid:  # a tokenizer that disagrees with its own factors
            raise ValueError(
                f"{type(self).__name__} encoded to {tuple(codes.shape[1:])}, not {grid}"
            )
        return codes

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
        size = [list(pixels.shape[-2:])] * pixels.shape[0]
        return torch.stack(self.model.encode(pixels, image_sizes=size).image_tokens)


class PerFrameVQ(VQDecoder):
    """Any image decoder applied frame by frame: a clip grid (t, h, w) is t frames, each coded
    on its own (tokens `b (f h w)`); a clip (B, T, 3, H, W) encodes to (B, T, h, w)."""

    grid_ranks = (3,)

    def __init__(self, image: VQDecoder) -> None:
        if 2 not in image.grid_ranks:
            raise ValueError(f"{type(image).__name__} does not decode (h, w) images")
        super().__init__(image.model)
        self.image = image
        self.codebook_size, self.spatial_factor = image.codebook_size, image.spatial_factor
        self.pixel_range = image.pixel_range

    def check_grid(self, grid: Sequence[int]) -> None:
        super().check_grid(grid)
        self.image.check_grid(tuple(grid)[1:])

    def _decode(self, codes: Tensor) -> Tensor:
        px = self.image._decode(rearrange(codes, "b t h w -> (b t) h w"))
        return rearrange(px, "(b t) c hh ww -> b t c hh ww", b=codes.shape[0])

    def _encode(self, pixels: Tensor) -> Tensor:
        codes = self.image._encode(rearrange(pixels, "b t c hh ww -> (b t) c hh ww"))
        return rearrange(codes, "(b t) h w -> b t h w", b=pixels.shape[0])


class VidTokVQ(VQDecoder):
    """diffusers `AutoencoderVidTok` with the FSQ regularizer, causal: a grid (t, h, w) decodes
    to 1 + r·(t − 1) frames (r = temporal factor, 4 by default): the first code slice holds
    frame 0 alone, which the encoder sees front-padded by r − 1 copies of itself (what
    `AutoencoderVidTok.forward` does), and the decoder drops those r − 1 frames again.
    Clips of another length are refused (VidTok itself would pad them silently)."""

    grid_ranks = (3,)

    def __init__(self, model: Any) -> None:
        if model.config.regularizer != "fsq":
            raise ValueError(
                "AutoencoderVidTok with regularizer='kl' is continuous (no code indices); "
                "use a regularizer='fsq' checkpoint"
            )
        if not model.is_causal:
            raise ValueError(
                "non-causal AutoencoderVidTok works on 16-frame chunks and truncates the rest; "
                "use a causal (is_causal=True) checkpoint"
            )
        super().__init__(model)
        self.codebook_size = int(model.regularization.codebook_size)
        self.spatial_factor = 2 ** len(model.encoder.spatial_ds)
        self.temporal_factor = int(model.temporal_compression_ratio)

    def frames(self, slices: int) -> int:
        return 1 + self.temporal_factor * (slices - 1)

    def slices(self, frames: int) -> int:
        r = self.temporal_factor
        if frames < 1 or (frames - 1) % r:
            raise ValueError(
                f"AutoencoderVidTok (causal, temporal factor {r}) takes clips of 1 + {r}·k "
                f"frames (1, {1 + r}, {1 + 2 * r}, ...), got {frames}"
            )
        return 1 + (frames - 1) // r

    def _decode(self, codes: Tensor) -> Tensor:
        return self.model.decode(codes, decode_from_indices=True).transpose(1, 2)

    def _encode(self, pixels: Tensor) -> Tensor:
        x = pixels.transpose(1, 2)  # (B, 3, T, H, W)
        x = torch.cat([x[:, :, :1]] * (self.temporal_factor - 1) + [x], 2)
        _, idx = self.model.encode(x)
        return idx


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


@VQ_DECODERS.register("vidtok")
def _load_vidtok(path: str, dtype: torch.dtype, **kw: Any) -> VQDecoder:
    from diffusers import AutoencoderVidTok

    return VidTokVQ(AutoencoderVidTok.from_pretrained(path, torch_dtype=dtype, **kw))


def load_vq_decoder(
    kind: str,
    path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    per_frame: bool = False,
    **kw: Any,
) -> VQDecoder:
    """A saved VQ tokenizer by kind (`VQ_DECODERS`: diffusers_vq, janus_vq, emu3_vq, vidtok);
    `per_frame` wraps an image tokenizer for clips (`PerFrameVQ`); `kw` goes to
    `from_pretrained` (e.g. subfolder="vqvae")."""
    loader: Callable[..., VQDecoder] = VQ_DECODERS[kind]
    dec = loader(path, dtype, **kw)
    dec.model.to(device)
    return PerFrameVQ(dec) if per_frame else dec
