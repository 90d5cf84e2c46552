"""Lazy exports: a package's public names imported from their modules on first use, so that
importing the package (grpo_ar, grpo_ar.adapters) does not import torch's heavy neighbours."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from typing import Any


def load_export(package: str, public: Mapping[str, str], name: str, relative: bool = False) -> Any:
    """The package's module-level `__getattr__`: `name` imported from the module `public[name]`
    (a submodule of `package` when `relative`) and cached on the package, so later lookups are
    plain attribute reads. Any other name raises AttributeError."""
    if name not in public:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    module = f"{package}.{public[name]}" if relative else public[name]
    value = getattr(importlib.import_module(module), name)
    setattr(sys.modules[package], name, value)
    return value
