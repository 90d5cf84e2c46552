"""model.precision at run time: autocast for the forwards, a gradient scaler for fp16-mixed,
the optimizer step through it.

Mixed precisions keep the weights and the optimizer state in fp32 (the master weights) and run
the forwards under autocast, so a small update is not rounded away; log-probs, losses and
advantages stay fp32 (the scorers promote logits to fp32). bf16-true updates bf16 weights
directly: cheaper, but an update below bf16's resolution (2^-8 relative) is lost."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

log = logging.getLogger("grpo_ar")

# model.precision -> the dtype matmuls run in
COMPUTE_DTYPE = {
    "fp32": torch.float32,
    "bf16-mixed": torch.bfloat16,
    "fp16-mixed": torch.float16,
    "bf16-true": torch.bfloat16,
    "fp16-true": torch.float16,
}


def compute_dtype(precision: str) -> torch.dtype:
    return COMPUTE_DTYPE[precision]


def is_mixed(precision: str) -> bool:
    return precision.endswith("-mixed")


class Precision:
    """One run's precision policy on `device`."""

    def __init__(self, precision: str, device: torch.device) -> None:
        self.name, self.device = precision, device
        self.dtype = compute_dtype(precision)
        self.mixed = is_mixed(precision)
        # fp16's 5-bit exponent underflows small gradients: scale the loss, unscale before the
        # clip, skip steps whose gradients overflowed (bf16 has fp32's range: no scaler)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16-mixed" else None
        if self.scaler is not None:  # its scale exists from the first scale(): make it now, so
            self.scaler.scale(torch.zeros((), device=device))  # a resume or skip can set it
        self._unscaled = False
        if precision.endswith("-true") and precision != "fp32":
            log.warning(
                "model.precision=%s: weights and optimizer state are %s and updated in place; an "
                "update smaller than 2^-8 of a weight is lost. bf16-mixed keeps fp32 master weights",
                precision,
                str(self.dtype).removeprefix("torch."),
            )

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Forwards in the compute dtype (mixed precisions); nothing changes otherwise."""
        if not self.mixed:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.dtype):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients back to their true size before they are clipped or measured."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
            self._unscaled = True

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)  # finite here: the trainer checked the norm first
        self.scaler.update()
        self._unscaled = False

    def skipped(self) -> None:
        """A pass whose loss or gradients were not finite: under fp16 the scale was too large,
        so it shrinks (by the scaler's backoff factor), as a skipped scaler step would."""
        if self.scaler is None:
            return
        if self._unscaled:  # the inf check is recorded: update() backs off
            self.scaler.update()
        else:
            self.scaler.update(new_scale=self.scaler.get_scale() * self.scaler.get_backoff_factor())
        self._unscaled = False

    def state_dict(self) -> dict[str, Any]:
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def same_family(a: str, b: str) -> bool:
    """False for a bf16 run resumed in fp16 or back (the seed's warning: never switch)."""
    pair = {compute_dtype(a), compute_dtype(b)}
    return pair != {torch.bfloat16, torch.float16}
