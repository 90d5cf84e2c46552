"""Checkpoints: safetensors only (nothing is unpickled), written atomically.

Layout of `checkpoints/step_000123/`: `model.safetensors` (policy state dict: the whole model,
or only the adapter tensors of a peft / LyCORIS fine-tune), optional `reference.safetensors`,
`state.safetensors` (optimizer tensors, RNG states) and `state.json` (everything else). A
checkpoint is written into a temporary sibling folder and renamed into place;
`checkpoints/latest` names the newest complete one. Tensor dicts whose entries share storage
(tied embeddings) are stored once, the other names kept as aliases in the file's metadata.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor

from ..errors import CheckpointError


def _flatten(obj: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """Replace tensors in a nested structure by {"__tensor__": key}; collect them."""
    if isinstance(obj, Tensor):
        key = prefix.strip(".")
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [_flatten(k, f"{prefix}.k{i}", tensors), _flatten(v, f"{prefix}.{i}", tensors)]
                for i, (k, v) in enumerate(obj.items())
            ]
        }
    if isinstance(obj, (list, tuple)):
        items = [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} in a checkpoint")


def _unflatten(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["sampler"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "sampler" in state:
        generator.set_state(state["sampler"])


ALIASES_KEY = "grpo_ar.aliases"
Weights = torch.nn.Module | Mapping[str, Tensor]


def save_tensors(
    tensors: Mapping[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """A name -> tensor dict into one safetensors file; entries sharing storage with an earlier
    entry (tied weights) are written once and recorded as aliases."""
    first: dict[tuple, str] = {}
    storages: set[tuple] = set()
    out: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in tensors.items():
        storage = (t.device, t.untyped_storage().data_ptr())
        key = (*storage, t.storage_offset(), t.shape, t.stride())
        if t.numel() and key in first:
            aliases[name] = first[key]
            continue
        first[key] = name
        t = t.detach()
        # other views of a stored storage are written as copies (safetensors refuses sharing)
        out[name] = (t.clone() if t.numel() and storage in storages else t).cpu().contiguous()
        storages.add(storage)
    meta = dict(metadata or {})
    if aliases:
        meta[ALIASES_KEY] = json.dumps(aliases)
    save_file(out, str(path), metadata=meta or None)


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """The dict written by `save_tensors` (aliases resolved to the same tensor)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        meta = f.metadata() or {}
    for name, target in json.loads(meta.get(ALIASES_KEY, "{}")).items():
        tensors[name] = tensors[target]
    return tensors


def _save_weights(weights: Weights, path: Path) -> None:
    if isinstance(weights, torch.nn.Module):
        # save_model stores tied weights (embeddings = LM head) once
        save_model(weights, str(path))
    else:
        save_tensors(weights, path)


def load_tied_state_dict(module: torch.nn.Module, sd: Mapping[str, Tensor]) -> None:
    """`module.load_state_dict(sd)`, strict, where names missing from `sd` may be filled from a
    name tied to the same storage in `module` (files written by `save_model` keep one name)."""
    own = module.state_dict()
    by_storage: dict[tuple[int, torch.Size], list[str]] = {}
    for name, t in own.items():
        by_storage.setdefault((t.untyped_storage().data_ptr(), t.shape), []).append(name)
    full = dict(sd)
    for names in by_storage.values():
        present = [n for n in names if n in full]
        for n in names:
            if n not in full and present:
                full[n] = full[present[0]]
    missing, unexpected = sorted(set(own) - set(full)), sorted(set(full) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"the weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    module.load_state_dict(full)


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's entries to disk, so a rename after it is never seen first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    directory: str | Path,
    model: Weights,
    state: dict[str, Any],
    reference: Weights | None = None,
    keep: int = 0,
) -> Path:
    """Write model (+ reference) weights — a module, or a name -> tensor dict such as an
    adapter's — and `state` (nested dicts/lists of tensors and JSON values) atomically into
    `directory`; keep only the newest `keep` checkpoints (0 = all).

    Order, so a kill at any point leaves `latest` naming a complete folder: write a hidden
    temporary folder, fsync, rename it into place, then point `latest` at it, then prune."""
    directory = Path(directory)
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=TMP_SUFFIX, dir=parent))
    try:
        _save_weights(model, tmp / "model.safetensors")
        if reference is not None:
            _save_weights(reference, tmp / "reference.safetensors")
        tensors: dict[str, Tensor] = {}
        meta = _flatten(state, "", tensors)
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
        for f in tmp.iterdir():
            _fsync(f)
        _fsync(tmp)
        if directory.exists():  # the same step again: set the old copy aside, never delete first
            aside = parent / f".{directory.name}{OLD_SUFFIX}"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(directory, aside)
            os.replace(tmp, directory)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, directory)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp_latest = parent / ".latest.tmp"
    tmp_latest.write_text(directory.name, encoding="utf-8")
    _fsync(tmp_latest)
    os.replace(tmp_latest, parent / "latest")
    _fsync(parent)
    if keep > 0:
        prune_checkpoints(parent, keep)
    return directory


TMP_SUFFIX, OLD_SUFFIX, PRUNED_SUFFIX = ".tmp", ".old", ".pruned"
STEP_NAME = re.compile(r"^step_\d+$")


def prune_checkpoints(ckpts: Path, keep: int) -> None:
    """Delete all but the newest `keep` step folders (never the one `latest` names); each is
    renamed to a hidden name first, so a kill mid-delete leaves no half folder named step_*."""
    latest = (ckpts / "latest").read_text(encoding="utf-8").strip()
    done = sorted(p for p in ckpts.glob("step_*") if p.is_dir() and STEP_NAME.match(p.name))
    for old in done[:-keep]:
        if old.name != latest:
            gone = ckpts / f".{old.name}{PRUNED_SUFFIX}"
            os.replace(old, gone)
            shutil.rmtree(gone, ignore_errors=True)


def clean_checkpoints(run_dir: str | Path) -> list[str]:
    """Remove what a killed save or prune left behind (hidden temporary, set-aside and pruned
    folders); a set-aside copy whose step folder is missing is put back. Returns the names
    removed. Called at start-up, before anything reads `latest`; no step_* folder is touched
    (an extra one a killed prune left is pruned by the next save)."""
    ckpts = Path(run_dir) / "checkpoints"
    if not ckpts.is_dir():
        return []
    removed = []
    for p in sorted(ckpts.glob(".*")):
        name = p.name
        if name.endswith(OLD_SUFFIX) and not (ckpts / name[1 : -len(OLD_SUFFIX)]).exists():
            os.replace(p, ckpts / name[1 : -len(OLD_SUFFIX)])
            continue
        if p.is_dir() and name.endswith((TMP_SUFFIX, OLD_SUFFIX, PRUNED_SUFFIX)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(name)
        elif name == ".latest.tmp":
            p.unlink()
            removed.append(name)
    return removed


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest complete checkpoint of a run directory: the `step_*` folder inside its
    checkpoints/ that `checkpoints/latest` names (anything else is refused, never followed)."""
    ckpts = Path(run_dir) / "checkpoints"
    pointer = ckpts / "latest"
    if not pointer.exists():
        raise CheckpointError(
            f"{run_dir}: no checkpoint to resume from (no checkpoints/latest); start the run "
            "again without --resume (and with --overwrite)"
        )
    name = _read_text(pointer).strip()
    steps = sorted(p.name for p in ckpts.glob("step_*") if p.is_dir())
    fix = (
        f"write the name of one of {steps} into {pointer}"
        if steps
        else "no checkpoint is left; start over with --overwrite"
    )
    if not STEP_NAME.match(name):
        raise CheckpointError(
            f"{pointer} names {name!r}, not a step_* folder of this run (refused: a checkpoint "
            f"is only read from inside the run directory): {fix}"
        )
    if (ckpts / name).resolve().parent != ckpts.resolve():
        raise CheckpointError(f"{ckpts / name} links outside the run directory (refused): {fix}")
    if not (ckpts / name / "state.json").is_file():
        raise CheckpointError(f"{pointer} names {name}, which is missing or incomplete: {fix}")
    return ckpts / name


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not text; it should hold a folder name") from None


def load_weights(module: torch.nn.Module, path: str | Path) -> None:
    """Load a `model.safetensors` / `reference.safetensors` of a checkpoint into `module`."""
    missing, unexpected = load_model(module, str(path), strict=False)
    if missing or unexpected:  # load_model already accounts for tied weights
        raise ValueError(
            f"{path} does not fit the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )


def load_state(directory: str | Path) -> dict[str, Any]:
    """The trainer state of a checkpoint folder."""
    directory = Path(directory)
    with checkpoint_file(directory / "state.safetensors") as path:
        tensors = load_file(path)
    with checkpoint_file(directory / "state.json") as path:
        meta = json.loads(path.read_text(encoding="utf-8"))
    return _unflatten(meta, tensors)


@contextmanager
def checkpoint_file(path: Path) -> Iterator[Path]:
    """Read a checkpoint file; a truncated, garbage or unreadable one raises CheckpointError
    naming it and the way out (an earlier checkpoint), not a parser's traceback."""
    fix = f"point {path.parent.parent / 'latest'} at an earlier step_* folder, or start over"
    try:
        if path.exists():  # safetensors reports an unreadable file as missing: open it first
            path.open("rb").close()
        yield path
    except PermissionError:
        raise CheckpointError(f"{path}: no permission to read it: fix its permissions") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; {fix}") from None
    except (SafetensorError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is damaged ({e}); {fix}") from None
