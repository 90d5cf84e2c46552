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

from ..errors import ConfigError
from ..io.checkpoint import latest_checkpoint, load_state, rng_state, save_checkpoint, set_rng_state


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
        "finetune": tr.finetune.method,
    }


def save_trainer(tr: Any) -> Path:
    directory = tr.run_dir / "checkpoints" / f"step_{tr.step:06d}"
    weights = tr.dist.policy_weights(tr.finetune)
    ref = tr.dist.reference_weights(tr.reference)
    state = trainer_state(tr)
    if tr.dist.is_main:
        save_checkpoint(directory, weights, state, reference=ref, keep=tr.cfg.log.keep_checkpoints)
    tr.dist.barrier()  # no rank reads the checkpoint before it is complete
    return directory


def resume_trainer(tr: Any, run_dir: str | Path) -> None:
    ckpt = latest_checkpoint(run_dir)
    state = load_state(ckpt)
    saved, now = state["dtype"], tr.cfg.model.dtype
    if {saved, now} == {"bfloat16", "float16"}:
        raise ConfigError(
            f"the run was trained in {saved}; resuming in {now} is refused "
            "(never switch between bf16 and fp16 mid-training)"
        )
    method = state.get("finetune", "full")
    if method != tr.finetune.method:
        raise ConfigError(
            f"the checkpoint was trained with finetune.method={method}; this run has "
            f"{tr.finetune.method}: set finetune.method={method}"
        )
    tr.dist.load_policy(tr.finetune, ckpt / "model.safetensors")
    tr.dist.load_reference(tr.reference, ckpt / "reference.safetensors")
    tr.dist.load_optimizer(tr.optimizer, state["optimizer"])
    tr.scheduler.load_state_dict(state["scheduler"])
    tr.prompts.load_state_dict(state["prompts"])
    set_rng_state(state["rng"], tr.generator)
    tr.step = int(state["step"])
    tr.updates = int(state.get("updates", 0))
    if "entropy" in state:
        tr.entropy.load_state_dict(state["entropy"])
