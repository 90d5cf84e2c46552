"""Modality adapters (installed as `grpo_ar.adapters`): tokenizer, sampler and decoder per
modality. The public names are `__all__`; the contract is `Adapter` (docs/adapters.md). Names
load on first use, so importing this package does not import diffusers or PIL."""

from __future__ import annotations

from typing import Any

from grpo_ar.lazy import load_export

_PUBLIC = {
    "Adapter": "base",
    "ADAPTERS": "registry",
    "AdapterSpec": "registry",
    "register_adapter": "registry",
    "TextAdapter": "text",
    "load_text_model": "text",
    "CodeGridAdapter": "code_grid",
    "ImageAdapter": "image",
    "ClassCondition": "code_grid",
    "TextCondition": "code_grid",
    "VideoAdapter": "video",
    "JanusT2IAdapter": "janus",
    "JanusImageCall": "janus",
    "save_clip": "video",
    "save_clips": "video",
    "CodeLayout": "codes",
    "MappedLayout": "mapped_codes",
    "ChameleonAdapter": "chameleon",
    "ChameleonForImageGeneration": "chameleon",
    "ChameleonVQ": "chameleon",
    "Emu3ImageAdapter": "emu3",
    "VQDecoder": "vq",
    "DiffusersVQ": "vq",
    "JanusVQ": "vq",
    "Emu3VQ": "vq",
    "PerFrameVQ": "vq",
    "VidTokVQ": "vq",
    "load_vq_decoder": "vq",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    return load_export(__name__, _PUBLIC, name, relative=True)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
