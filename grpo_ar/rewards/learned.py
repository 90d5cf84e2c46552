"""What the learned image rewards (PickScore, HPSv2, ImageReward, the VLM judge) share: setup
checks that name the key to change, weights from a local folder/file or a hub id, and the batch
call (texts from the entry, images in same-size chunks, no-grad, then
`(raw - norm_mean) / norm_std`).

Nothing here imports transformers or huggingface_hub until a model is loaded.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import RewardContext, RewardSpecError
from .clip import caption
from .pixels import map_images

HUB_ID = re.compile(
    r"^[A-Za-z0-9][\w.-]*/[\w.-]+$"
)  # owner/name, as the Hugging Face hub spells it
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RewardSetupError(RewardSpecError, ConfigError):
    """A reward setup value that must change; the message names data.reward_setup.<reward>.<key>."""


def setup_error(reward: str, key: str, value: Any, problem: str, fix: str) -> RewardSetupError:
    """The error for setup key `key` of `reward`: its value, what is wrong, what to set."""
    where = f"data.reward_setup.{reward}.{key}"
    return RewardSetupError(
        f"reward setup of {reward!r}: {key}={str(value)!r} {problem}; set {where} to {fix}"
    )


def check_source(reward: str, key: str, value: Any, what: str) -> str:
    """`value` as a string: an existing local path, or else a hub id (`owner/name`) to fetch.

    A path-like value that does not exist (`./x`, `/x`, `a/b/c`, `~`) is refused before loading.
    """
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise setup_error(reward, key, value, "is not a path or hub id", what)
    text = str(value)
    if Path(text).expanduser().exists():
        return str(Path(text).expanduser())
    if not HUB_ID.match(text):
        raise setup_error(
            reward, key, value, "does not exist and is not a hub id (owner/name)", what
        )
    return text


def resolve_file(reward: str, key: str, value: Any, filename: str, what: str) -> str:
    """A local weights file: `value` itself, `value/filename`, or `filename` from hub repo `value`
    (downloaded into the Hugging Face cache; offline, the cached copy)."""
    source = check_source(reward, key, value, what)
    path = Path(source)
    if path.is_file():
        return source
    if path.is_dir():
        if not (path / filename).is_file():
            raise setup_error(reward, key, value, f"is a folder without {filename}", what)
        return str(path / filename)
    from huggingface_hub import hf_hub_download

    try:
        return str(hf_hub_download(source, filename))
    except Exception as e:  # hub errors are many types; all mean "not loadable from here"
        raise setup_error(reward, key, value, f"has no {filename} I can fetch: {e}", what) from None


def load_state_dict(reward: str, key: str, path: str, what: str) -> dict[str, Tensor]:
    """A flat name -> tensor dict from .safetensors, or from a torch checkpoint loaded with
    weights_only=True (no pickled code runs); a checkpoint dict's `state_dict` is unwrapped."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd: Any = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's text suggests weights_only=False: not here
        problem = "is not a plain tensor checkpoint (torch.load(weights_only=True) refuses it)"
        raise setup_error(reward, key, path, problem, what) from None
    except Exception as e:  # truncated files, foreign formats
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise setup_error(reward, key, path, f"does not load as weights: {first}", what) from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise setup_error(reward, key, path, "holds no name -> tensor state dict", what)
    return sd


def from_pretrained(
    reward: str, key: str, source: str, what: str, load: Callable[[str], Any]
) -> Any:
    """`load(source)` with a failure turned into a setup error naming `key`."""
    try:
        return load(source)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise setup_error(reward, key, source, f"does not load: {e}", what) from None


@dataclass(frozen=True)
class ScorerSetup:
    """Run-level settings every learned reward takes, checked before any weights load."""

    device: torch.device
    dtype: torch.dtype  # of the scorer's weights; images are preprocessed in float32, then cast
    batch_size: int  # images per forward pass
    norm_mean: float  # reward = (raw score - norm_mean) / norm_std, to put rewards on one scale
    norm_std: float

    @classmethod
    def check(
        cls, reward: str, device: str | torch.device | None, dtype: str | None, batch_size: int,
        norm_mean: float, norm_std: float,
    ) -> ScorerSetup:  # fmt: skip
        """The checked settings; a RewardSetupError naming the first bad key."""
        if dtype is not None and dtype not in DTYPES:
            raise setup_error(
                reward, "dtype", dtype, "is not supported", "one of " + ", ".join(DTYPES)
            )
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise setup_error(
                reward, "batch_size", batch_size, "is not a positive integer", "1 or more"
            )
        for key, v in (("norm_mean", norm_mean), ("norm_std", norm_std)):
            if (
                not isinstance(v, (int, float))
                or not math.isfinite(v)
                or (key == "norm_std" and v == 0)
            ):
                raise setup_error(
                    reward, key, v, "is not usable", "a finite number (norm_std non-zero)"
                )
        try:
            dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except (RuntimeError, TypeError) as e:
            raise setup_error(
                reward, "device", device, f"is not a device: {e}", "cpu, cuda or cuda:N"
            ) from None
        return cls(dev, DTYPES[dtype or "float32"], batch_size, float(norm_mean), float(norm_std))


def assemble(build: Callable[[], Any], sd: Mapping[str, Tensor]) -> Any:
    """`build()` on the meta device, then `sd` assigned strictly: every parameter must come from
    `sd` and every `sd` key must land (no random init of a billion parameters first).
    Non-persistent buffers (position ids: aranges) are rebuilt on CPU."""
    with torch.device("meta"):
        model = build()
    model.load_state_dict(sd, strict=True, assign=True)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            if buf.dtype != torch.long:
                raise ValueError(f"buffer {name} is not in the weights and is not position ids")
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, torch.arange(buf.shape[-1]).expand(buf.shape))
    return model


def features(out: Any) -> Tensor:
    """A `get_*_features` result as a tensor (transformers >= 5 returns an output object)."""
    return out if isinstance(out, Tensor) else out.pooler_output


def frozen(model: Any, setup: ScorerSetup) -> Any:
    """`model` in eval mode, without gradients, in the setup's dtype and on its device."""
    return model.to(device=setup.device, dtype=setup.dtype).eval().requires_grad_(False)


class LearnedImageReward:
    """Scores images against their entry's text: arg `text`, else the entry's prompt (`caption`);
    a sample with neither scores None. Subclasses implement `score_images`."""

    name = "learned"

    def __init__(self, setup: ScorerSetup) -> None:
        self.setup = setup
        self.device, self.dtype, self.batch_size = setup.device, setup.dtype, setup.batch_size

    def score_images(self, x: Tensor, texts: list[str]) -> Tensor:
        """(B, 3, H, W) float in [0, 1], B texts -> (B,) raw scores (float32)."""
        raise NotImplementedError

    @torch.no_grad()
    def normalised(self, x: Tensor, texts: list[str]) -> Tensor:
        """(B,) `(score_images - norm_mean) / norm_std`, float32."""
        return (self.score_images(x, texts).float() - self.setup.norm_mean) / self.setup.norm_std

    def __call__(
        self, outputs: list[Any], args: list[dict], ctx: RewardContext
    ) -> list[float | None]:
        texts = [a.get("text") or caption(e.prompt) for a, e in zip(args, ctx.entries)]
        ok = [i for i, t in enumerate(texts) if t is not None]
        fn = lambda x, idx: self.normalised(x, [texts[ok[i]] for i in idx]).cpu()  # noqa: E731
        got = map_images(fn, [outputs[i] for i in ok], self.batch_size).tolist()
        out: list[float | None] = [None] * len(outputs)
        for i, v in zip(ok, got):
            out[i] = v
        return out
