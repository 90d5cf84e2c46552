"""An example's script loaded as a module, for the smoke tests of examples/, and the recorder
of what an example draws, for its protocol test."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from grpo_ar.train.trainer import Trainer

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


class SeedRecorder:
    """What an example draws and encodes while it runs, by phase (issue 23's protocol tests):
    every generator seed (`torch.manual_seed`, `torch.Generator.manual_seed`) and every prompt
    `adapter_cls.encode` sees, under the phase of the innermost `phased` call: "grpo" inside
    `Trainer.train`, the name a test gives its example's evaluation, "other" elsewhere."""

    def __init__(self, mp: pytest.MonkeyPatch, adapter_cls: type) -> None:
        self.phase = "other"
        self.seeds: dict[str, set[int]] = defaultdict(set)
        self.prompts: dict[str, list[Any]] = defaultdict(list)
        rec, original, manual_seed, encode = (
            self,
            torch.Generator,
            torch.manual_seed,
            adapter_cls.encode,
        )

        class Recording(original):  # type: ignore[misc, valid-type]
            def manual_seed(self, seed):
                rec.seeds[rec.phase].add(int(seed))
                return super().manual_seed(seed)

        def recording_manual_seed(seed):
            rec.seeds[rec.phase].add(int(seed))
            return manual_seed(seed)

        def recording_encode(adapter, entries):
            rec.prompts[rec.phase] += [e.prompt for e in entries]
            return encode(adapter, entries)

        mp.setattr(torch, "Generator", Recording)
        mp.setattr(torch, "manual_seed", recording_manual_seed)
        mp.setattr(adapter_cls, "encode", recording_encode)
        mp.setattr(Trainer, "train", self.phased("grpo", Trainer.train))

    def phased(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn`, recording under phase `name` while it runs."""

        def wrapped(*a: Any, **k: Any) -> Any:
            before, self.phase = self.phase, name
            try:
                return fn(*a, **k)
            finally:
                self.phase = before

        return wrapped
