"""An example's script loaded as a module, for the smoke tests of examples/, and the recorder
of what an example draws, for its protocol test."""

from __future__ import annotations

import contextlib
import importlib.util
import json
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


class RecordingGenerator(torch.Generator):
    """A real torch generator that remembers every seed it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.seeds: list[int] = []

    def manual_seed(self, seed: int) -> torch.Generator:  # type: ignore[override]
        self.seeds.append(int(seed))
        return super().manual_seed(seed)


def tiny_argv(
    tmp: Path, run: str, tiny: list[str], *extra: str, samples_per_step: int = 4
) -> list[str]:
    """An AR image example's run.py arguments at tiny sizes: pre-training overrides `tiny`
    (cached in tmp/base), 2 GRPO steps of 2 prompts x 2 samples into tmp/run, 2 held-out
    samples per prompt; `extra` comes last (its --set wins)."""
    sets = ["trainer.steps=2", "trainer.batch_size=2", "trainer.warmup_steps=0",
            "algorithm.group_size=2", f"log.samples_per_step={samples_per_step}",
            f"log.run_dir={tmp / run}"]  # fmt: skip
    argv = ["--base", str(tmp / "base"), "--eval-samples", "2"]
    argv += [x for kv in tiny for x in ("--pretrain-set", kv)]
    return argv + [x for kv in sets for x in ("--set", kv)] + list(extra)


def training_rows(lines: list[str]) -> list[dict]:
    """metrics.jsonl rows without the wall-clock timings."""
    rows = [json.loads(x) for x in lines]
    return [
        {k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s"))} for r in rows
    ]


def grid_cells(saved: dict, train_seeds: list[int], eval_seeds: list[int]) -> list[dict]:
    """results.json's cells, after checking they are every training seed x evaluation seed
    pair in order and that its protocol names those seeds."""
    protocol = saved["protocol"]
    assert (protocol["train_seeds"], protocol["eval_seeds"]) == (train_seeds, eval_seeds)
    cells = saved["cells"]
    assert [(c["train_seed"], c["eval_seed"]) for c in cells] == [
        (t, e) for t in train_seeds for e in eval_seeds
    ]
    return cells


def two_by_two_grid(main: Callable[[list[str]], Any], argv: list[str], run_dir: Path) -> dict:
    """results.json of `main(argv + training seeds 0 1, evaluation seeds 5 6)` (run_dir: the
    run's folder), after checking it holds what main returned, the four cells in order, and
    that each cell's "before" is the start model's sampled metrics under that evaluation seed."""
    res = main([*argv, "--seeds", "0", "1", "--eval-seeds", "5", "6"])
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(res["summary"]))
    assert [(c["train_seed"], c["eval_seed"]) for c in saved["cells"]] == [
        (0, 5), (0, 6), (1, 5), (1, 6)]  # fmt: skip
    assert all(c["before"] == saved["before"]["sampled"][str(c["eval_seed"])]
               for c in saved["cells"])  # fmt: skip
    return saved


def train_recording_seeds(trainer: Trainer, train: list[str], held: list[str], steps: int,
                          samples: int) -> list[dict]:  # fmt: skip
    """Train `trainer` (every sample logged) with a generator that records its seeds, and check
    issue 23's protocol on it: its `samples` logged samples draw every training prompt and no
    held-out one, and it seeds only the streams `check_eval_seeds` assumes (the last step's
    sampling among them), never an evaluation seed. Returns the history."""
    from ar_common.seeds import EVAL_SEEDS, training_streams

    from grpo_ar.parallel.ddp import derive_seed

    trainer.generator = RecordingGenerator()
    history = trainer.train()
    assert len(history) == steps
    rows = (Path(trainer.run_dir) / "samples.jsonl").read_text().splitlines()
    drawn = {json.loads(r)["prompt"] for r in rows}
    assert len(rows) == samples and drawn == set(train) and not drawn & set(held)
    used, seed = set(trainer.generator.seeds), trainer.cfg.trainer.seed
    assert used <= training_streams(seed, steps) and derive_seed(seed, steps - 1, 0) in used
    assert not used & set(EVAL_SEEDS)
    return history


def assert_clash_refused(main: Callable[[list[str]], Any], argv: Callable[..., list[str]],
                         tmp: Path) -> None:  # fmt: skip
    """An evaluation seed that is a training stream (training seed 1, step 1) stops `main`
    before it writes anything, with the message naming the seed."""
    from grpo_ar.parallel.ddp import derive_seed

    clash = derive_seed(1, 1, 0)
    with pytest.raises(SystemExit, match=rf"evaluation seed\(s\) \[{clash}\] are random streams"):
        main(argv(tmp, "clash", "--seeds", "1", "--eval-seeds", "777", str(clash)))
    assert not (tmp / "clash").exists()
