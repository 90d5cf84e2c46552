"""AR video adapter: a causal LM over video codes, conditioned by prefix tokens, with CFG.

Everything but the layout is shared with images (`code_grid.CodeGridAdapter`: class/text conditions
and their CFG-unconditional prompts, fixed-length sampling inside the codebook, the CFG-scale
record, `cfg_train` same|conditional, chunked decoding). A clip is a (t, h, w) grid of codes in
raster order, tokens `b (t h w)`, decoded by any `VQDecoder` of rank-3 grids:

- `PerFrameVQ(image_decoder)`: t frames, each coded on its own by any image tokenizer;
- `Emu3VQ` (transformers `Emu3VQVAE`): 4 frames per code slice; with `eol_token_id` /
  `eof_token_id`, Emu3's LM layout: every row of w codes ends with EOL, every (h, w) slice with
  EOF (a frame break), both forced at their positions in sampling and scored identically;
- `VidTokVQ` (diffusers `AutoencoderVidTok`, FSQ, causal): 1 + 4·(t − 1) frames.

`decode` gives one clip per sample: frames `(F, H, W, 3)` uint8 (default) or `(F, 3, H, W)` float
in [0, 1]; `decode_pixels` the batched `(N, F, 3, H, W)` floats. `save_clip` writes an animated
GIF or a frame-strip PNG for sample logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from grpo_ar.generation.params import SamplingParams
from grpo_ar.types import Rollout

from .code_grid import ClassCondition, CodeGridAdapter, TextCondition
from .codes import CodeLayout, to_uint8
from .vq import VQDecoder


class VideoAdapter(CodeGridAdapter):
    """Class- or text-conditioned AR video generation over a VQ codebook, with CFG.

    `grid` is (t, h, w) codes per clip (`video_grid` finds it from a frame count and size);
    `code_offset` the LM id of code 0; `video_prefix_ids` follow the condition in both CFG
    branches; `eol_token_id` / `eof_token_id` give Emu3's row layout.
    """

    kind = "a clip"

    def __init__(
        self,
        decoder: VQDecoder,
        sampling: SamplingParams,
        grid: Sequence[int],
        code_offset: int,
        condition: ClassCondition | TextCondition,
        video_prefix_ids: Sequence[int] = (),
        cfg_train: Literal["same", "conditional"] = "same",
        detach_uncond: bool = False,
        output: Literal["uint8", "float"] = "uint8",
        decode_batch_size: int = 0,
        eol_token_id: int | None = None,
        eof_token_id: int | None = None,
    ) -> None:
        if len(grid) != 3:
            raise ValueError(
                f"VideoAdapter takes a (t, h, w) code grid, got {tuple(grid)}; for an image "
                "tokenizer applied frame by frame wrap it in vq.PerFrameVQ"
            )
        if output not in ("uint8", "float"):
            raise ValueError(f"output={output!r}: use 'uint8' (F, H, W, 3) or 'float' (F, 3, H, W)")
        layout = CodeLayout(
            tuple(grid), code_offset, decoder.codebook_size, eol_token_id, eof_token_id
        )
        super().__init__(
            decoder, sampling, layout, condition, video_prefix_ids, cfg_train, detach_uncond,
            decode_batch_size,
        )  # fmt: skip
        self.output = output

    @property
    def frame_size(self) -> tuple[int, int, int]:
        """(F, H, W) of a decoded clip."""
        return self.decoder.pixel_size(self.layout.grid)  # type: ignore[return-value]

    def decode(self, rollout: Rollout) -> list[Tensor]:
        """One clip per sample: (F, H, W, 3) uint8, or (F, 3, H, W) float in [0, 1]."""
        unit = self.decode_pixels(rollout)  # (N, F, 3, H, W)
        return list(unit) if self.output == "float" else list(to_uint8(unit))

    def summarize(self, output: Any) -> dict[str, list[int]]:
        """{"clip": [F, H, W]} for a decoded clip of either `output` kind."""
        f, h, w, _ = clip_frames(output).shape
        return {"clip": [f, h, w]}

    def save_samples(
        self, outputs: Sequence[Any], directory: str | Path, fmt: Literal["gif", "png"] = "gif"
    ) -> list[Path]:
        """Write decoded clips as animated GIFs (or frame-strip PNGs); the paths."""
        return save_clips(outputs, directory, fmt=fmt)


def video_grid(decoder: VQDecoder, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The (t, h, w) code grid of clips of `frames` frames of height × width pixels; refuses a
    frame count or size the tokenizer cannot take (e.g. 8 frames for causal VidTok: 1 + 4k)."""
    grid = decoder.grid_for((frames, height, width))
    if len(grid) != 3:
        raise ValueError(f"{type(decoder).__name__} does not code clips")
    return grid  # type: ignore[return-value]


# -- sample logging -----------------------------------------------------------------------------
def clip_frames(clip: Any) -> Tensor:
    """A decoded clip -> (F, H, W, 3) uint8: uint8 (F, H, W, 3) as is, float (F, 3, H, W) in
    [0, 1] converted."""
    x = clip if isinstance(clip, Tensor) else torch.as_tensor(clip)
    if x.ndim == 4 and x.dtype == torch.uint8 and x.shape[-1] == 3:
        return x.cpu()
    if x.ndim == 4 and x.is_floating_point() and x.shape[1] == 3:
        return to_uint8(x.detach().float().clamp(0, 1)).cpu()
    raise ValueError(
        f"a clip is (F, H, W, 3) uint8 or (F, 3, H, W) float, got {x.dtype} {tuple(x.shape)}"
    )


def frame_strip(clip: Any, gap: int = 1) -> Tensor:
    """(H, F·W + (F − 1)·gap, 3) uint8: the frames side by side, white gaps between them."""
    frames = clip_frames(clip)
    f, h, _, _ = frames.shape
    sep = torch.full((h, gap, 3), 255, dtype=torch.uint8)
    parts = [p for i in range(f) for p in ((sep,) if i else ()) + (frames[i],)]
    return torch.cat(parts, 1)


def save_clip(clip: Any, path: str | Path, fps: float = 8.0, scale: int = 1) -> Path:
    """Write a clip as an animated GIF (`.gif`, looping, ~1/fps s per frame: GIF stores frame
    times in centiseconds, so 8 fps is written as 120 ms, and Pillow merges consecutive identical
    frames into one longer frame) or a frame strip (`.png`); `scale` enlarges pixels (nearest) so
    tiny clips stay visible."""
    from PIL import Image

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".png"):
        raise ValueError(f"save_clip writes .gif or .png, got {path.name!r}")
    if scale < 1 or fps <= 0:
        raise ValueError(f"need scale >= 1 and fps > 0, got scale={scale}, fps={fps}")
    path.parent.mkdir(parents=True, exist_ok=True)

    def image(x: Tensor) -> Any:
        im = Image.fromarray(x.numpy())
        return (
            im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
            if scale > 1
            else im
        )

    if suffix == ".png":
        image(frame_strip(clip)).save(path)
        return path
    frames = [image(x) for x in clip_frames(clip)]
    frames[0].save(
        path,
        save_all=True,
        append_images=frames[1:],
        duration=max(int(round(1000 / fps)), 10),
        loop=0,
        disposal=1,
        optimize=False,
    )
    return path


def save_clips(
    clips: Sequence[Any],
    directory: str | Path,
    prefix: str = "sample",
    fmt: Literal["gif", "png"] = "gif",
    fps: float = 8.0,
    scale: int = 1,
) -> list[Path]:
    """Write clips as `{prefix}_{i:03d}.{fmt}` under `directory`; the paths written."""
    if fmt not in ("gif", "png"):
        raise ValueError(f"fmt={fmt!r}: use 'gif' (animated) or 'png' (frame strip)")
    out = Path(directory)
    return [save_clip(c, out / f"{prefix}_{i:03d}.{fmt}", fps, scale) for i, c in enumerate(clips)]


__all__ = [
    "VideoAdapter",
    "clip_frames",
    "frame_strip",
    "save_clip",
    "save_clips",
    "video_grid",
]
