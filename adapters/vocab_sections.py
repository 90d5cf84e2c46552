"""Config sections `[chameleon]` and `[emu3]`: text-to-image models whose image codes are tokens
of their text vocabulary (adapters/chameleon.py, adapters/emu3.py). Kept apart from those
modules so that reading a config imports neither transformers' model code nor diffusers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from grpo_ar.errors import need

_OUTPUTS = ("pil", "uint8", "float")


@dataclass(frozen=True)
class VocabImageConfig:
    """What the Chameleon and Emu3 sections share: grid, prompt, CFG and outputs."""

    grid: list[int] = field(default_factory=lambda: [32, 32])
    """Codes per image [h, w] (pixels: h·16 × w·16 for Chameleon's VQGAN, h·8 × w·8 for Emu3's)."""
    prompt_template: str = "{prompt}"
    """How the prompt string is wrapped before tokenising."""
    negative_prompt: str = ""
    """CFG negative prompt for uncond = negative (a row's metadata.negative_prompt wins)."""
    cfg_train: str = "same"
    """same: train under sampling.cfg_scale; conditional: cond-only (use algorithm.is_correction)."""
    detach_uncond: bool = False
    """Under cfg_train = same: no gradient through the unconditional branch."""
    output: str = "pil"
    """What rewards receive: pil, uint8 (H, W, 3) or float (3, H, W) in [0, 1]."""
    decode_batch_size: int = 0
    """Samples decoded per VQ call (0 = all at once)."""
    uncond: str = "negative"
    """CFG unconditional prompt: negative (negative_prompt in the same prompt format) or masked
    (the prompt padded except BOS)."""

    uncond_modes: ClassVar[tuple[str, ...]] = ("negative", "masked")
    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        sec = self.section
        need(
            len(self.grid) == 2 and min(self.grid) >= 1,
            f"{sec}.grid={self.grid}: give [h, w] codes per image",
        )
        for key, val, ok in [
            ("cfg_train", self.cfg_train, ("same", "conditional")),
            ("output", self.output, _OUTPUTS),
            ("uncond", self.uncond, self.uncond_modes),
        ]:
            need(val in ok, f"{sec}.{key}={val!r}: use one of {', '.join(ok)}")
        need(self.decode_batch_size >= 0, f"{sec}.decode_batch_size must be >= 0")


@dataclass(frozen=True)
class ChameleonT2IConfig(VocabImageConfig):
    """Chameleon / Lumina-mGPT text-to-image (model.adapter = "chameleon")."""

    section: ClassVar[str] = "chameleon"

    decoder_path: str = ""
    """Chameleon VQGAN decoder weights (a .safetensors file or a folder holding
    decoder.safetensors, diffusers `Decoder` names; transformers' ChameleonVQVAE has none)."""
    layout: str = "chameleon"
    """chameleon: <racm3:break>, h·w codes, <eoss>; lumina_mgpt: <racm3:break>, the two
    grid-size tokens, rows of w codes each ended by <reserved08799>, <eoss>."""
    uncond: str = "image_start"
    """CFG unconditional prompt: image_start (only the image-start tokens, as Lumina-mGPT),
    negative (negative_prompt), masked (the prompt padded except BOS)."""

    uncond_modes: ClassVar[tuple[str, ...]] = ("image_start", "negative", "masked")

    def __post_init__(self) -> None:
        super().__post_init__()
        need(bool(self.decoder_path), "chameleon.decoder_path is empty: give the VQGAN decoder")
        need(
            self.layout in ("chameleon", "lumina_mgpt"),
            f"chameleon.layout={self.layout!r}: use chameleon or lumina_mgpt",
        )


@dataclass(frozen=True)
class Emu3T2IConfig(VocabImageConfig):
    """Emu3 text-to-image (model.adapter = "emu3"); the VQ model is the checkpoint's own."""

    section: ClassVar[str] = "emu3"

    grid: list[int] = field(default_factory=lambda: [90, 90])
    """Codes per image [h, w]; the prompt's size tokens read "h*w" (Emu3's default 720×720)."""
    uncond: str = "negative"
    """CFG unconditional prompt: negative (negative_prompt in the same T2I format, as Emu3's
    own generation script) or masked (the prompt padded except BOS)."""
