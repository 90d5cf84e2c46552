"""AR image adapter: a causal LM over VQ codes (LlamaGen-style), conditioned by prefix tokens.

The LM's vocabulary is `[special / condition tokens ... | K codes at code_offset]`. A prompt is
the condition prefix (a class id: `[BOS, class token]`; or text through a user tokenizer) then
optional image-start tokens; the completion is exactly h·w codes in raster order (no EOS; plus
Emu3's layout tokens where asked, below), sampled only inside the codebook range. Decoding goes
through a `VQDecoder` (adapters/vq.py).

`adapters/code_grid.py` holds what images and clips share (conditions, CFG, fixed-length
sampling in the codebook, Emu3's EOL/EOF layout); this module only the (h, w) grid and the
image outputs.
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
from .codes import CodeLayout, to_pil, to_uint8
from .vq import VQDecoder

# ClassCondition, TextCondition and CodeGridAdapter lived here; this path keeps importing them
__all__ = ["ClassCondition", "CodeGridAdapter", "ImageAdapter", "TextCondition"]


class ImageAdapter(CodeGridAdapter):
    """Class- or text-conditioned AR image generation over a VQ codebook, with CFG.

    `grid` is (h, w) codes per image; `code_offset` the LM id of code 0 (the LM's codebook block
    has the decoder's `codebook_size` ids); `image_prefix_ids` follow the condition in both CFG
    branches (e.g. Janus's `<begin_of_image>`); `eol_token_id` / `eof_token_id` give Emu3's row
    layout; `layout` replaces those three (codes named in a text vocabulary, with more layout
    tokens: adapters/mapped_codes.py). `output`: what `decode` returns per sample, a PIL image,
    a (H, W, 3) uint8 tensor or a (3, H, W) float tensor in [0, 1] (views of one batch).
    """

    kind = "an image"

    def __init__(
        self,
        decoder: VQDecoder,
        sampling: SamplingParams,
        grid: Sequence[int],
        code_offset: int,
        condition: ClassCondition | TextCondition,
        image_prefix_ids: Sequence[int] = (),
        cfg_train: Literal["same", "conditional"] = "same",
        detach_uncond: bool = False,
        output: Literal["pil", "uint8", "float"] = "pil",
        decode_batch_size: int = 0,
        eol_token_id: int | None = None,
        eof_token_id: int | None = None,
        layout: CodeLayout | None = None,
    ) -> None:
        if len(grid) != 2:
            raise ValueError(
                f"ImageAdapter takes an (h, w) code grid, got {tuple(grid)}; clips go through "
                "adapters.video.VideoAdapter"
            )
        if output not in ("pil", "uint8", "float"):
            raise ValueError(f"output={output!r}: use 'pil', 'uint8' or 'float'")
        if layout is None:
            layout = CodeLayout(
                tuple(grid), code_offset, decoder.codebook_size, eol_token_id, eof_token_id
            )
        elif layout.grid != tuple(grid):
            raise ValueError(f"grid {tuple(grid)} differs from the layout's grid {layout.grid}")
        super().__init__(
            decoder, sampling, layout, condition, image_prefix_ids, cfg_train, detach_uncond,
            decode_batch_size,
        )  # fmt: skip
        self.output = output

    @property
    def image_prefix_ids(self) -> list[int]:
        """Tokens after the condition in both CFG branches (e.g. <begin_of_image>)."""
        return self.prefix_ids

    def decode(self, rollout: Rollout) -> list[Any]:
        unit = self.decode_pixels(rollout)
        if self.output == "float":
            return list(unit)
        images = to_uint8(unit)
        return list(images) if self.output == "uint8" else to_pil(images)

    def summarize(self, output: Any) -> dict[str, list[int]]:
        """{"image": [H, W]} for a decoded image of any `output` kind."""
        if isinstance(output, Tensor):
            h, w = output.shape[:2] if output.dtype == torch.uint8 else output.shape[1:]
            return {"image": [int(h), int(w)]}
        return {"image": [output.height, output.width]}

    def save_samples(self, outputs: Sequence[Any], directory: str | Path) -> list[Path]:
        """Write decoded images (any `output` kind) as `sample_{i:03d}.png`; the paths."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, img in enumerate(outputs):
            if isinstance(img, Tensor):
                img = img if img.dtype == torch.uint8 else to_uint8(img[None])[0]
                img = to_pil(img[None])[0]
            paths.append(out / f"sample_{i:03d}.png")
            img.save(paths[-1])
        return paths
