"""Config sections of the code-grid adapters: `[image]` and `[video]` share everything but the
grid's rank, the prefix tokens' name and the video-only per-frame switch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from ..errors import need

_DECODERS = ("diffusers_vq", "janus_vq", "emu3_vq", "vidtok")


@dataclass(frozen=True)
class CodeGridConfig:
    """VQ tokenizer, code layout, condition and CFG of an AR image / video model."""

    section: ClassVar[str] = "grid"
    outputs: ClassVar[tuple[str, ...]] = ("uint8", "float")
    rank: ClassVar[int] = 2
    if TYPE_CHECKING:  # fields of each subclass, with its own defaults (not fields here)
        grid: list[int]
        output: str

    decoder: str = "diffusers_vq"
    """VQ tokenizer kind: diffusers_vq, janus_vq, emu3_vq, vidtok (video)."""
    decoder_path: str = ""
    """Folder of the saved VQ tokenizer (from_pretrained)."""
    decoder_subfolder: str | None = None
    """Subfolder inside decoder_path (e.g. "vqvae")."""
    code_offset: int = 0
    """LM token id of code 0."""
    eol_token_id: int | None = None
    """Emu3 layout: end-of-line token after each code row (forced at its positions)."""
    eof_token_id: int | None = None
    """Emu3 layout: end-of-frame token after each (h, w) slice."""
    condition: str = "class"
    """class (prompt = int class id) or text (prompt = string; tokenizer from model.path)."""
    class_offset: int = 0
    """LM token id of class 0."""
    num_classes: int = 1000
    """Number of class tokens."""
    null_class_token: int | None = None
    """CFG null class token (default class_offset + num_classes)."""
    bos_token_id: int | None = None
    """BOS before the class token (class condition)."""
    prompt_template: str = "{prompt}"
    """Text condition: how the prompt string is wrapped before tokenising."""
    uncond: str = "masked"
    """Text CFG null prompt: masked (pad except BOS) or negative (metadata/negative_prompt)."""
    negative_prompt: str = ""
    """Default negative prompt for uncond = negative."""
    cfg_train: str = "same"
    """same: train under sampling.cfg_scale; conditional: cond-only (use algorithm.is_correction)."""
    detach_uncond: bool = False
    """Under cfg_train = same: no gradient through the unconditional branch."""
    decode_batch_size: int = 0
    """Samples decoded per VQ call (0 = all at once)."""

    def __post_init__(self) -> None:
        sec = self.section
        for key, val, ok in [
            ("decoder", self.decoder, _DECODERS),
            ("condition", self.condition, ("class", "text")),
            ("uncond", self.uncond, ("masked", "negative")),
            ("cfg_train", self.cfg_train, ("same", "conditional")),
            ("output", self.output, self.outputs),
        ]:
            need(val in ok, f"{sec}.{key}={val!r}: use one of {', '.join(ok)}")
        grid = self.grid
        shape = "[h, w]" if self.rank == 2 else "[t, h, w] (code frames, rows, columns)"
        need(len(grid) == self.rank and min(grid) >= 1, f"{sec}.grid={grid}: give {shape}")
        need(self.eof_token_id is None or self.eol_token_id is not None,
             f"{sec}.eof_token_id needs eol_token_id (Emu3's row layout)")  # fmt: skip


@dataclass(frozen=True)
class ImageConfig(CodeGridConfig):
    """AR image models (model.adapter = "image")."""

    section: ClassVar[str] = "image"
    outputs: ClassVar[tuple[str, ...]] = ("pil", "uint8", "float")

    grid: list[int] = field(default_factory=lambda: [16, 16])
    """Codes per image [h, w]; sets sampling.max_new_tokens to h*w (h*(w+1)+1 with EOL/EOF)."""
    image_prefix_ids: list[int] = field(default_factory=list)
    """Tokens after the condition in both CFG branches (e.g. <begin_of_image>)."""
    output: str = "pil"
    """What rewards receive: pil, uint8 (H, W, 3) or float (3, H, W) in [0, 1]."""

    def __post_init__(self) -> None:
        need(self.decoder != "vidtok", "image.decoder='vidtok' is a video tokenizer: use [video]")
        super().__post_init__()


@dataclass(frozen=True)
class VideoConfig(CodeGridConfig):
    """AR video models (model.adapter = "video")."""

    section: ClassVar[str] = "video"
    rank: ClassVar[int] = 3

    grid: list[int] = field(default_factory=lambda: [4, 8, 8])
    """Codes per clip [t, h, w]; sets sampling.max_new_tokens to t*h*w (t*(h*(w+1)+1) with
    Emu3's EOL/EOF layout); the tokenizer must be able to take the frame count."""
    per_frame: bool | None = None
    """Apply an image tokenizer frame by frame (tokens b (f h w)); None: yes for the 2D ones
    (diffusers_vq, janus_vq), no for the 3D ones (emu3_vq, vidtok)."""
    video_prefix_ids: list[int] = field(default_factory=list)
    """Tokens after the condition in both CFG branches."""
    output: str = "uint8"
    """What rewards receive: uint8 (F, H, W, 3) or float (F, 3, H, W) in [0, 1]."""

    def __post_init__(self) -> None:
        super().__post_init__()
        need(
            self.per_frame is not False or self.decoder in ("emu3_vq", "vidtok"),
            f"video.decoder={self.decoder!r} is a 2D tokenizer: it only runs per frame "
            "(video.per_frame = true)",
        )
        need(
            not (self.per_frame and self.decoder == "vidtok"),
            "video.per_frame = true with decoder 'vidtok': VidTok is a 3D tokenizer",
        )

    @property
    def frame_wise(self) -> bool:
        """Whether the decoder runs frame by frame (per_frame resolved)."""
        if self.per_frame is not None:
            return self.per_frame
        return self.decoder in ("diffusers_vq", "janus_vq")
