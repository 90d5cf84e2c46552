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
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import Tensor


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


def save_checkpoint(
    directory: str | Path,
    model: Weights,
    state: dict[str, Any],
    reference: Weights | None = None,
    keep: int = 0,
) -> Path:
    """Write model (+ reference) weights — a module, or a name -> tensor dict such as an
    adapter's — and `state` (nested dicts/lists of tensors and JSON values) atomically into
    `directory`; keep only the newest `keep` checkpoints (0 = all)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        _save_weights(model, tmp / "model.safetensors")
        if reference is not None:
            _save_weights(reference, tmp / "reference.safetensors")
        tensors: dict[str, Tensor] = {}
        meta = _flatten(state, "", tensors)
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    latest = directory.parent / "latest"
    tmp_latest = directory.parent / ".latest.tmp"
    tmp_latest.write_text(directory.name, encoding="utf-8")
    os.replace(tmp_latest, latest)
    if keep > 0:
        done = sorted(p for p in directory.parent.glob("step_*") if p.is_dir())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return directory


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest complete checkpoint of a run directory."""
    ckpts = Path(run_dir) / "checkpoints"
    pointer = ckpts / "latest"
    if not pointer.exists():
        raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from (no checkpoints/latest)")
    return ckpts / pointer.read_text(encoding="utf-8").strip()


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
    tensors = load_file(directory / "state.safetensors")
    return _unflatten(json.loads((directory / "state.json").read_text(encoding="utf-8")), tensors)
