"""The run configuration: one frozen dataclass per concern, loaded from TOML / YAML plus
`--set key.path=value` overrides, validated before anything loads."""

from __future__ import annotations

from ..errors import ConfigError
from ..finetune.base import FinetuneConfig
from .algorithm import AlgorithmConfig
from .modality import CodeGridConfig, ImageConfig, VideoConfig
from .run import (
    Config,
    DataConfig,
    LogConfig,
    ModelConfig,
    TrainerConfig,
    apply_overrides,
    config_to_dict,
    load_config,
    read_raw,
    save_config,
)

__all__ = [
    "AlgorithmConfig",
    "CodeGridConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "FinetuneConfig",
    "ImageConfig",
    "LogConfig",
    "ModelConfig",
    "TrainerConfig",
    "VideoConfig",
    "apply_overrides",
    "config_to_dict",
    "load_config",
    "read_raw",
    "save_config",
]
