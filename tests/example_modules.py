"""An example's script loaded as a module, for the smoke tests of examples/."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@contextlib.contextmanager
def example_module(folder: str, name: str) -> Iterator[ModuleType]:
    """examples/<folder>/<name>.py as a module; the folder stays on sys.path until the block
    ends, since the script imports its sibling files (task.py, pretrain.py) when it runs."""
    where = str(EXAMPLES / folder)
    sys.path.insert(0, where)
    try:
        spec = importlib.util.spec_from_file_location(
            f"{folder}_{name}", EXAMPLES / folder / f"{name}.py"
        )
        assert spec is not None and spec.loader is not None, f"no examples/{folder}/{name}.py"
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(where)


def load_example(folder: str, name: str) -> ModuleType:
    """examples/<folder>/<name>.py as a module, for a script whose functions import nothing
    more once it is loaded."""
    with example_module(folder, name) as module:
        return module
