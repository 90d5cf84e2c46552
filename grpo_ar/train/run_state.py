"""A Trainer's checkpoint: policy weights (the whole model, or only the adapter tensors of a
peft / LyCORIS fine-tune), the reference's (a frozen copy; a frozen adapter copy once refreshed,
no file while it is still the base) and the trainer state (optimizer, scheduler, data order,
RNG, entropy controller). Written atomically by grpo_ar.io.checkpoint; nothing is unpickled.

Under torchrun every rank calls these (FSDP2 gathers full state dicts, a collective); rank 0
writes, in the one-process format, so a checkpoint resumes in one process or any world size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError, RunError, is_disk_full
from ..io.checkpoint import (
    checkpoint_file,
    clean_checkpoints,
    latest_checkpoint,
    load_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ..io.run_files import truncate_run_files
from .precision import compute_dtype, same_family


def trainer_state(tr: Any) -> dict[str, Any]:
    return {
        "step": tr.step,
        "updates": tr.updates,
        "entropy": tr.entropy.state_dict(),
        "optimizer": tr.dist.optimizer_state(tr.optimizer),
        "scheduler": tr.scheduler.state_dict(),
        "prompts": tr.prompts.state_dict(),
        "rng": rng_state(tr.generator),
        "dtype": tr.cfg.model.dtype,
        "precision": tr.cfg.model.precision,
        "grad_scaler": tr.precision.state_dict(),
        "finetune": tr.finetune.method,
    }


def save_trainer(tr: Any) -> Path:
    directory = tr.run_dir / "checkpoints" / f"step_{tr.step:06d}"
    weights = tr.dist.policy_weights(tr.finetune)
    ref = tr.dist.reference_weights(tr.reference)
    state = trainer_state(tr)
    if tr.dist.is_main:
        try:
            keep = tr.cfg.log.keep_checkpoints
            save_checkpoint(directory, weights, state, reference=ref, keep=keep)
        except Exception as e:
            if not is_disk_full(e):
                raise
            raise RunError(
                f"disk full writing the checkpoint {directory}; the previous one is intact: "
                f"free space, then continue with `grpo-ar train --resume {tr.run_dir}`"
            ) from e
    tr.dist.barrier()  # no rank reads the checkpoint before it is complete
    tr.saved_step = tr.step
    return directory


def resume_trainer(tr: Any, run_dir: str | Path) -> None:
    """Load the newest checkpoint of `run_dir`; then metrics.jsonl / samples.jsonl hold only
    what steps up to it wrote, so the resumed steps add each row once."""
    if tr.dist.is_main:
        clean_checkpoints(run_dir)
    tr.dist.barrier()
    ckpt = latest_checkpoint(run_dir)
    state = load_state(ckpt)
    # checkpoints from before model.precision hold only the storage dtype
    saved = state.get("precision") or {"bfloat16": "bf16-true", "float16": "fp16-true"}.get(
        state["dtype"], "fp32"
    )
    now = tr.cfg.model.precision
    if not same_family(saved, now):
        name = lambda p: f"{p} ({str(compute_dtype(p)).removeprefix('torch.')})"  # noqa: E731
        raise ConfigError(
            f"the run was trained in {name(saved)}; resuming in {name(now)} is refused "
            "(never switch between bf16 and fp16 mid-training)"
        )
    method = state.get("finetune", "full")
    if method != tr.finetune.method:
        raise ConfigError(
            f"the checkpoint was trained with finetune.method={method}; this run has "
            f"{tr.finetune.method}: set finetune.method={method}"
        )
    with checkpoint_file(ckpt / "model.safetensors") as path:
        tr.dist.load_policy(tr.finetune, path)
    with checkpoint_file(ckpt / "reference.safetensors") as path:
        tr.dist.load_reference(tr.reference, path)
    tr.dist.load_optimizer(tr.optimizer, state["optimizer"])
    tr.precision.load_state_dict(state.get("grad_scaler", {}))
    tr.scheduler.load_state_dict(state["scheduler"])
    tr.prompts.load_state_dict(state["prompts"])
    set_rng_state(state["rng"], tr.generator)
    tr.step = int(state["step"])
    tr.updates = int(state.get("updates", 0))
    if "entropy" in state:
        tr.entropy.load_state_dict(state["entropy"])
    tr.saved_step = tr.step
    if tr.dist.is_main:
        truncate_run_files(tr.run_dir, tr.step)
