"""Entries (prompt + reward spec), loaders (JSONL, Python lists, HF datasets), prompt sampler.

The seed: "the dataset should be seen as input-reward func pairs": each entry names the reward
function(s) that score its outputs, with weights and arguments (e.g. the expected answer).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..types import Entry, RewardSpec


def _spec_from(raw: Any, where: str) -> list[RewardSpec]:
    """Accepts "name", {"name": .., "weight": .., "args": {..}}, {name: args, ...}, or a list of those."""
    if isinstance(raw, str):
        return [RewardSpec(raw)]
    if isinstance(raw, Mapping) and "name" in raw:
        unknown = set(raw) - {"name", "weight", "args"}
        if unknown:
            raise DataError(
                f"{where}: reward spec has unknown key(s) {sorted(unknown)}; use name, weight, args"
            )
        args = raw.get("args", {})
        if not isinstance(args, Mapping):
            raise DataError(f"{where}: reward 'args' must be a mapping, got {type(args).__name__}")
        try:
            weight = float(raw.get("weight", 1.0))
        except (TypeError, ValueError):
            raise DataError(
                f"{where}: reward 'weight' must be a number, got {raw.get('weight')!r}"
            ) from None
        return [RewardSpec(str(raw["name"]), weight, dict(args))]
    if isinstance(raw, Mapping):
        out = []
        for name, args in raw.items():
            if args is None:
                args = {}
            if not isinstance(args, Mapping):
                raise DataError(f"{where}: arguments of reward {name!r} must be a mapping")
            args = dict(args)
            weight = args.pop("weight", 1.0)
            try:
                weight = float(weight)
            except (TypeError, ValueError):
                raise DataError(
                    f"{where}: weight of reward {name!r} must be a number, got {weight!r}"
                ) from None
            out.append(RewardSpec(str(name), weight, args))
        return out
    if isinstance(raw, list):
        return [s for item in raw for s in _spec_from(item, where)]
    raise DataError(
        f"{where}: field 'rewards' must be a name, a mapping or a list, got {type(raw).__name__}"
    )


def _resolve(value: Any, row: Mapping[str, Any], where: str) -> Any:
    """A default spec's argument "$field" reads the row's field (e.g. {"answer": "$solution"})."""
    if isinstance(value, str) and value.startswith("$") and not value.startswith("$$"):
        key = value[1:]
        if key not in row:
            raise DataError(
                f"{where}: reward argument refers to field {key!r}, which the row lacks"
            )
        return row[key]
    return value


def entry_from_row(
    row: Mapping[str, Any],
    where: str,
    prompt_field: str = "prompt",
    default_rewards: Sequence[Mapping[str, Any]] | None = None,
) -> Entry:
    """One dataset row -> Entry. Row rewards (field `rewards`) are used as given; otherwise the
    default specs apply with their "$field" arguments read from the row. Other fields -> metadata."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if prompt_field not in row:
        raise DataError(f"{where}: missing field {prompt_field!r} (the prompt)")
    if row[prompt_field] is None:
        raise DataError(f"{where}: field {prompt_field!r} (the prompt) is null: give the prompt")
    if "rewards" in row and row["rewards"] is not None:
        specs = _spec_from(row["rewards"], where)
    elif default_rewards:
        specs = [
            RewardSpec(s.name, s.weight, {k: _resolve(v, row, where) for k, v in s.args.items()})
            for s in _spec_from(list(default_rewards), where)
        ]
    else:
        raise DataError(
            f"{where}: no reward: give the row a 'rewards' field or set data.rewards in the config"
        )
    meta = {k: v for k, v in row.items() if k not in (prompt_field, "rewards")}
    return Entry(row[prompt_field], tuple(specs), meta)


def load_jsonl(path: str | Path, **kw: Any) -> list[Entry]:
    """Read a JSONL file of rows; a malformed line raises naming file and line."""
    entries = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{where}: not UTF-8 (byte {e.start} of the line): save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            entries.append(entry_from_row(row, where, **kw))
    if not entries:
        raise DataError(f"{path}: no rows")
    return entries


def load_rows(rows: Iterable[Mapping[str, Any]], source: str = "rows", **kw: Any) -> list[Entry]:
    """Python rows (dicts) or Entry objects -> entries; also HF `datasets.Dataset` (iterates dicts)."""
    arrow = type(rows).__module__.startswith("datasets")
    out = []
    for i, row in enumerate(rows):
        if arrow and isinstance(row, Mapping) and "rewards" in row:
            # Arrow unifies row structs, filling keys a row lacks with None: drop them again
            row = {**row, "rewards": _drop_none(row["rewards"])}
        out.append(row if isinstance(row, Entry) else entry_from_row(row, f"{source}[{i}]", **kw))
    if not out:
        raise DataError(f"{source}: no rows")
    return out


def _drop_none(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {k: _drop_none(v) for k, v in x.items() if v is not None}
    if isinstance(x, list):
        return [_drop_none(v) for v in x]
    return x


def load_hf(name: str, split: str = "train", config: str | None = None, **kw: Any) -> list[Entry]:
    """A Hugging Face `datasets` dataset (local path or cached name) -> entries."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("loading HF datasets needs `pip install datasets`") from e
    folder = Path(name)
    if folder.is_dir() and any((folder / f).exists() for f in ("state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(str(folder))  # a `save_to_disk` folder
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        try:
            ds = datasets.load_dataset(name, config, split=split)
        except (OSError, ValueError, ConnectionError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(
                f"hf:{name}:{split}: cannot load the dataset ({first}): give a local "
                "save_to_disk folder, a dataset already in the HF cache, or a JSONL file"
            ) from None
    return load_rows(ds, source=f"{name}[{split}]", **kw)


def load_entries(source: str | Path, **kw: Any) -> list[Entry]:
    """`*.jsonl` files, or `hf:NAME[:SPLIT]` for HF datasets."""
    s = str(source)
    if s.startswith("hf:"):
        parts = s[3:].split(":", 1)
        return load_hf(parts[0], parts[1] if len(parts) > 1 else "train", **kw)
    if not Path(s).exists():
        raise DataError(f"{s}: no such file")
    return load_jsonl(s, **kw)


class PromptSampler:
    """Yields `batch_size` entries per step, reshuffled each epoch, seeded; resumable by state."""

    def __init__(self, entries: Sequence[Entry], batch_size: int, seed: int = 0) -> None:
        if batch_size > len(entries):
            raise ConfigError(
                f"trainer.batch_size={batch_size} exceeds the {len(entries)} entries of the "
                "training data: lower trainer.batch_size or add rows"
            )
        self.entries, self.batch_size, self.seed = list(entries), batch_size, seed
        self.epoch, self.pos = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.entries)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next_batch(self) -> list[Entry]:
        if self.pos + self.batch_size > len(self._order):  # drop the ragged tail of an epoch
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._shuffle()
        idx = self._order[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return [self.entries[i] for i in idx]

    def __iter__(self) -> Iterator[list[Entry]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.seed, self.epoch, self.pos = state["seed"], state["epoch"], state["pos"]
        self._order = self._shuffle()
