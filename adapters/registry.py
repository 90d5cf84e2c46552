"""`ADAPTERS`: every modality by name, with its config section and how to build it.

A modality registers a builder under the name `model.adapter` selects:

    @register_adapter("tones", ToneConfig)
    def build_tones(config, section, device, dtype):
        model = AutoModelForCausalLM.from_pretrained(config.model.path, dtype=dtype)
    model = model.to(device)  # type: ignore[arg-type]  # transformers' decorated `to`
        return model, ToneAdapter(config.sampling, samples=section.samples)

The config's `[tones]` table is then parsed into `ToneConfig` (a frozen dataclass; unknown keys
refused with the valid ones) and handed to the builder as `section`; `grpo-ar train` builds
whatever is registered through `build_adapter`. A modality outside the package is found by
`model.adapter_module` (imported before the rest of the config is read; see
`import_adapter_module`) or by an installed entry point in the group `grpo_ar.adapters`.
Importing a module runs its code: a config is trusted like code.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from grpo_ar.config.modality import ImageConfig, VideoConfig
from grpo_ar.core.registry import Registry, same_definition
from grpo_ar.errors import ConfigError

from .base import Adapter
from .janus import JanusT2IConfig
from .janus_reason import JanusReasonConfig
from .vocab_sections import ChameleonT2IConfig, Emu3T2IConfig

ENTRY_POINT_GROUP = "grpo_ar.adapters"


class AdapterBuilder(Protocol):
    """(model, adapter) of a run, from its whole config and the adapter's own section."""

    def __call__(
        self,
        config: Any,  # the run's Config: model.path, sampling, ... (build from config.sampling)
        section: Any,  # the adapter's parsed section (e.g. ImageConfig), None without one
        device: str,  # resolved: "cpu", "cuda", "cuda:N"
        dtype: torch.dtype,  # model.dtype
    ) -> tuple[Any, Adapter]: ...


@dataclass(frozen=True)
class AdapterSpec:
    """A registered modality: its name, builder and config-section class."""

    name: str
    """`model.adapter` value and config table name ([name])."""
    build: AdapterBuilder
    """(config, section, device, dtype) -> (model, adapter)."""
    config_cls: type | None = None
    """Frozen dataclass of the [name] table (None: the adapter takes no section)."""


class AdapterRegistry(Registry[AdapterSpec]):  # type: ignore[type-var]
    """Name -> AdapterSpec; a name not registered yet is looked up among installed entry points
    (group `grpo_ar.adapters`) before it is refused."""

    def __init__(self) -> None:
        super().__init__("adapter")

    def register(  # type: ignore[override]
        self, name: str, config_cls: type | None = None
    ) -> Callable[[AdapterBuilder], AdapterBuilder]:
        """Decorator registering `build` under `name` with its section class. Registering the
        same definition again (a module both run and imported, a re-run notebook cell) replaces
        it; another builder under a taken name is refused."""
        if not name.isidentifier():
            raise ValueError(f"adapter name {name!r} must be an identifier (it names a table)")

        def deco(build: AdapterBuilder) -> AdapterBuilder:
            old = self._fns.get(name)
            same_cls = old is None or getattr(old.config_cls, "__qualname__", None) == getattr(
                config_cls, "__qualname__", None
            )
            if old is not None and not (same_cls and same_definition(old.build, build)):
                raise ValueError(
                    f"adapter {name!r} is already registered (by {old.build.__module__}."
                    f"{getattr(old.build, '__qualname__', old.build)}); choose another name"
                )
            self._fns[name] = AdapterSpec(name, build, config_cls)
            return build

        return deco

    def __getitem__(self, name: str) -> AdapterSpec:
        if name not in self._fns:
            load_entry_point(name)
        return super().__getitem__(name)

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str) and name not in self._fns:
            load_entry_point(name)
        return name in self._fns


ADAPTERS = AdapterRegistry()
register_adapter = ADAPTERS.register


def load_entry_point(name: str) -> None:
    """Import the module of an installed entry point `name` of the group `grpo_ar.adapters`
    (it registers the adapter); nothing when there is none."""
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP, name=name):
        importlib.import_module(ep.module)


def import_adapter_module(module: str, path: str = "") -> None:
    """Import `module` (model.adapter_module), which registers an adapter. The working directory
    is not searched (a file there named like the module is not picked up by accident) unless
    `path` (model.adapter_path) names it; `path` is put first on sys.path for this and later
    imports. Runs the module's code: a config is trusted like code."""
    folder = ""
    if path:
        folder = str(Path(path).resolve())
        if not Path(folder).is_dir():
            raise ConfigError(
                f"model.adapter_path={path!r} is not a folder; give the folder holding {module}"
            )
        if folder not in sys.path:
            sys.path.insert(0, folder)
    cwd = os.getcwd()
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if os.path.abspath(p or ".") != cwd or (folder and p == folder)]
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not module.startswith(e.name):
            raise  # the module itself imports something missing: the user's to fix
        raise ConfigError(
            f"model.adapter_module={module!r} cannot be imported ({e}); install it, or set "
            "model.adapter_path to the folder holding it (the working directory is not searched "
            "unless named, e.g. model.adapter_path = '.')"
        ) from None
    finally:
        sys.path[:] = [p for p in sys.path if p not in saved] + saved


# -- the built-in modalities --------------------------------------------------------------------
@register_adapter("text")
def build_text(config: Any, section: Any, device: str, dtype: torch.dtype) -> tuple[Any, Adapter]:
    """Any AutoModelForCausalLM and its tokenizer from model.path (`TextAdapter`)."""
    from .text import TextAdapter, load_text_model

    m = config.model
    model, tok = load_text_model(
        m.path, dtype=dtype, device=device, attn_implementation=m.attn_implementation
    )
    adapter = TextAdapter(
        tok,
        config.sampling,
        chat_template=m.chat_template,
        max_prompt_tokens=m.max_prompt_tokens,
        system_prompt=m.system_prompt,
    )
    return model, adapter


@register_adapter("image", ImageConfig)
def build_image(
    config: Any, section: ImageConfig, device: str, dtype: torch.dtype
) -> tuple[Any, Adapter]:
    """An AR image model: the LM from model.path, VQ tokenizer and condition from [image]."""
    return build_code_grid(config, section, device, dtype)


@register_adapter("video", VideoConfig)
def build_video(
    config: Any, section: VideoConfig, device: str, dtype: torch.dtype
) -> tuple[Any, Adapter]:
    """An AR video model: the LM from model.path, VQ tokenizer and condition from [video]."""
    return build_code_grid(config, section, device, dtype)


@register_adapter("chameleon", ChameleonT2IConfig)
def build_chameleon(
    config: Any, section: ChameleonT2IConfig, device: str, dtype: torch.dtype
) -> tuple[Any, Adapter]:
    """Chameleon / Lumina-mGPT text-to-image from model.path, its VQGAN decoder from
    [chameleon] decoder_path (adapters/chameleon.py)."""
    from .chameleon import build_chameleon as build

    return build(config, section, device, dtype)


@register_adapter("emu3", Emu3T2IConfig)
def build_emu3(
    config: Any, section: Emu3T2IConfig, device: str, dtype: torch.dtype
) -> tuple[Any, Adapter]:
    """Emu3 text-to-image from model.path with its own VQ model (adapters/emu3.py)."""
    from .emu3 import build_emu3 as build

    return build(config, section, device, dtype)


def build_code_grid(
    config: Any, sec: ImageConfig | VideoConfig, device: str, dtype: torch.dtype
) -> tuple[Any, Adapter]:
    """The LM from model.path, the VQ tokenizer and condition from an [image] / [video] section."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .code_grid import ClassCondition, TextCondition
    from .image import ImageAdapter
    from .text import load_causal_lm
    from .video import VideoAdapter
    from .vq import load_vq_decoder

    kind = sec.section
    if not sec.decoder_path:
        raise ConfigError(f"{kind}.decoder_path is empty: give the folder of the VQ tokenizer")
    attn = config.model.attn_implementation
    model = load_causal_lm(AutoModelForCausalLM, config.model.path, dtype, device, attn)
    kw: dict[str, Any] = {"subfolder": sec.decoder_subfolder} if sec.decoder_subfolder else {}
    if isinstance(sec, VideoConfig):
        kw["per_frame"] = sec.frame_wise
    decoder = load_vq_decoder(sec.decoder, sec.decoder_path, device=device, **kw)  # fp32 decode
    if sec.condition == "class":
        cond: Any = ClassCondition(
            sec.class_offset, sec.num_classes, sec.bos_token_id, sec.null_class_token
        )
    else:
        tok = AutoTokenizer.from_pretrained(config.model.path)
        cond = TextCondition(tok, sec.prompt_template, sec.uncond, sec.negative_prompt)  # type: ignore[arg-type]  # validated by the section
    video = isinstance(sec, VideoConfig)
    cls: Any = VideoAdapter if video else ImageAdapter
    prefix = sec.video_prefix_ids if isinstance(sec, VideoConfig) else sec.image_prefix_ids
    adapter = cls(
        decoder, config.sampling, sec.grid, sec.code_offset, cond, prefix,
        cfg_train=sec.cfg_train, detach_uncond=sec.detach_uncond, output=sec.output,
        decode_batch_size=sec.decode_batch_size, eol_token_id=sec.eol_token_id,
        eof_token_id=sec.eof_token_id,
    )  # fmt: skip
    return model, adapter


@register_adapter("janus_t2i", JanusT2IConfig)
def build_janus(
    config: Any, section: JanusT2IConfig, device: str, dtype: torch.dtype
) -> tuple[Any, Adapter]:
    """Janus-Pro text-to-image: JanusForConditionalGeneration and its tokenizer from model.path,
    prompts, CFG and trained parts from [janus_t2i] (adapters/janus.py)."""
    from .janus import build_janus_t2i

    return build_janus_t2i(config, section, device, dtype)


@register_adapter("janus_reason_t2i", JanusReasonConfig)
def build_janus_reason(
    config: Any, section: JanusReasonConfig, device: str, dtype: torch.dtype
) -> tuple[Any, Adapter]:
    """Janus-Pro T2I-R1 style: a text plan, then the image, in one completion of typed spans;
    model and tokenizer from model.path, options from [janus_reason_t2i] (adapters/janus_reason.py)."""
    from .janus_reason import build_janus_reason as build

    return build(config, section, device, dtype)
