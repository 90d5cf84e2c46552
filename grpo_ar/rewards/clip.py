"""CLIP-based image rewards with local weights: `aesthetic_laion` (LAION aesthetic predictor v2)
and `clip_score`. Every scorer runs batched under no-grad; transformers is imported only when
a CLIP reward is built."""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import RewardContext, RewardSpecError, register_reward
from .pixels import image_to_tensor, map_images

# ---------------------------------------------------------------- CLIP loading and preprocessing

_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL codes


@functools.lru_cache(maxsize=1)
def pillow_major() -> int:
    """The installed Pillow's major version (read from its metadata: PIL is not imported)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version("pillow").split(".")[0])
    except (PackageNotFoundError, ValueError):
        return 13


@dataclass(frozen=True)
class ClipPreprocess:
    """Batched torch version of transformers' CLIP image processor on (B, 3, H, W) in [0, 1].

    Resize: separable antialiased passes in Pillow's order, each rounded to 1/255 like Pillow's
    8-bit resampling, so results match `CLIPImageProcessorPil` to within one grey level.
    """

    size: int | tuple[int, int] | None  # shortest edge, (height, width), or None: no resize
    crop: tuple[int, int] | None  # center crop (height, width)
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    mode: str = "bicubic"

    @classmethod
    def from_processor(cls, proc: Any) -> ClipPreprocess:
        s, c = proc.size, proc.crop_size
        size: int | tuple[int, int] | None
        if not proc.do_resize:
            size = None
        elif s.shortest_edge and not s.longest_edge:
            size = int(s.shortest_edge)
        elif s.height and s.width:
            size = (int(s.height), int(s.width))
        else:
            raise ValueError(f"image processor size {s} is not supported; use shortest_edge")
        mode = _RESAMPLE.get(int(proc.resample))
        if mode is None:
            raise ValueError(f"resample={proc.resample} is not supported; use bicubic or bilinear")
        norm = proc.do_normalize
        return cls(
            size,
            (int(c.height), int(c.width)) if proc.do_center_crop else None,
            tuple(map(float, proc.image_mean)) if norm else (0.0, 0.0, 0.0),
            tuple(map(float, proc.image_std)) if norm else (1.0, 1.0, 1.0),
            mode,
        )

    def resize(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if self.size is None:
            return x
        if isinstance(self.size, tuple):
            nh, nw = self.size
        elif w <= h:  # transformers' get_resize_output_image_size(default_to_square=False)
            nh, nw = int(self.size * h / w), self.size
        else:
            nh, nw = self.size, int(self.size * w / h)
        q = lambda t: t.clamp(0, 1).mul(255).round().div(255)  # noqa: E731
        kw: dict[str, Any] = dict(mode=self.mode, antialias=True, align_corners=False)
        # Pillow 13 (libImaging/Resample.c) runs the height pass first when the height
        # shrinks by more than twice as many pixels as the width; else, and always in earlier
        # releases, the width pass first (the order changes the 8-bit rounding)
        if pillow_major() >= 13 and h - nh > max(0, 2 * (w - nw)):
            x = q(F.interpolate(x, size=(nh, w), **kw))
        if nw != w:
            x = q(F.interpolate(x, size=(x.shape[-2], nw), **kw))
        if x.shape[-2] != nh:
            x = q(F.interpolate(x, size=(nh, nw), **kw))
        return x

    def __call__(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, crop_h, crop_w) normalised pixel_values (float32)."""
        x = self.resize(x.float())
        if self.crop is not None:
            (ch, cw), (h, w) = self.crop, x.shape[-2:]
            if ch > h or cw > w:
                raise ValueError(f"center crop {self.crop} is larger than the resized {(h, w)}")
            top, left = (h - ch) // 2, (w - cw) // 2  # transformers' center_crop (floor)
            x = x[..., top : top + ch, left : left + cw]
        mean, std = (
            torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (self.mean, self.std)
        )
        return (x - mean) / std


def _setup_error(reward: str, key: str, value: Any, problem: str) -> RewardSpecError:
    fix = f"set data.reward_setup.{reward}.{key} to {_FIX[key]}"
    return RewardSpecError(f"reward setup of {reward!r}: {key}={str(value)!r} {problem}; {fix}")


_FIX = {
    "clip_path": "a local folder saved with CLIPModel.save_pretrained and its processor",
    "mlp_path": "the LAION aesthetic predictor's .pth (state dict, layers.*) or .safetensors",
}


@functools.lru_cache(maxsize=4)
def load_clip(path: str, device: str, dtype: str | None = None) -> tuple[Any, ClipPreprocess]:
    """(CLIPModel in eval mode, frozen, on device; its ClipPreprocess); cached, so rewards share."""
    from transformers import AutoImageProcessor, CLIPModel

    kw = {} if dtype is None else {"dtype": getattr(torch, dtype)}
    model = CLIPModel.from_pretrained(path, **kw).to(device).eval().requires_grad_(False)  # type: ignore[arg-type]
    return model, ClipPreprocess.from_processor(AutoImageProcessor.from_pretrained(path))


class ClipReward:
    """Run-level CLIP setup shared by the CLIP rewards: load once, embed images in batches."""

    name = "clip"

    def __init__(
        self,
        clip_path: str | os.PathLike,
        device: str | None = None,
        batch_size: int = 32,
        dtype: str | None = None,
    ) -> None:
        path = Path(clip_path)
        if not (path / "config.json").is_file():
            raise _setup_error(self.name, "clip_path", clip_path, "has no config.json")
        if not (path / "preprocessor_config.json").is_file():
            raise _setup_error(self.name, "clip_path", clip_path, "has no preprocessor_config.json")
        if batch_size < 1 or dtype not in (None, "float32", "float16", "bfloat16"):
            raise RewardSpecError(
                f"reward setup of {self.name!r}: need batch_size >= 1 and dtype one of "
                f"float32, float16, bfloat16; got batch_size={batch_size}, dtype={dtype!r}"
            )
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.model, self.preprocess = load_clip(str(path.resolve()), str(device), dtype)
        except (OSError, ValueError, KeyError) as e:
            raise _setup_error(self.name, "clip_path", clip_path, f"does not load: {e}") from None
        self.path, self.batch_size = path, batch_size
        self.device = next(self.model.parameters()).device

    @torch.no_grad()
    def embed_images(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D) L2-normalised projected CLIP image embeddings, fp32."""
        px = self.preprocess(x.to(self.device)).to(self.model.dtype)
        out = self.model.get_image_features(pixel_values=px)
        emb = out if isinstance(out, Tensor) else out.pooler_output  # transformers >= 5: object
        return F.normalize(emb.float(), dim=-1)


# ---------------------------------------------------------------- aesthetic_laion

LAION_MLP_KEYS = tuple(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))


class LaionAestheticMLP(nn.Module):
    """LAION aesthetic predictor v2 head (christophschuhmann/improved-aesthetic-predictor,
    simple_inference.py `MLP`): Linear, Dropout(0.2), Linear, Dropout(0.2), Linear,
    Dropout(0.1), Linear, Linear; no activations. dims (768, 1024, 128, 64, 16, 1) for ViT-L/14."""

    def __init__(self, dims: Sequence[int] = (768, 1024, 128, 64, 16, 1)) -> None:
        super().__init__()
        d = list(dims)
        self.layers = nn.Sequential(
            nn.Linear(d[0], d[1]),
            nn.Dropout(0.2),
            nn.Linear(d[1], d[2]),
            nn.Dropout(0.2),
            nn.Linear(d[2], d[3]),
            nn.Dropout(0.1),
            nn.Linear(d[3], d[4]),
            nn.Linear(d[4], d[5]),
        )

    def forward(self, emb: Tensor) -> Tensor:
        """(B, D) L2-normalised CLIP image embeddings -> (B,) scores."""
        return self.layers(emb).squeeze(-1)


def load_laion_mlp(path: str | os.PathLike) -> LaionAestheticMLP:
    """The predictor from a `layers.*` state dict: .safetensors, or .pth via weights_only=True."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping) or set(sd) != set(LAION_MLP_KEYS):
        got = sorted(sd) if isinstance(sd, Mapping) else type(sd).__name__
        raise ValueError(f"expected exactly the keys {', '.join(LAION_MLP_KEYS)}; found {got}")
    w = [sd[f"layers.{i}.weight"] for i in (0, 2, 4, 6, 7)]
    mlp = LaionAestheticMLP([w[0].shape[1], *(t.shape[0] for t in w)])
    mlp.load_state_dict(sd)  # strict: shapes must chain
    return mlp.eval().requires_grad_(False)


@register_reward("aesthetic_laion", defaults={})
class LaionAesthetic(ClipReward):
    """LAION aesthetic predictor v2: MLP(L2-normalised CLIP image embedding), about 1-10 with the
    released ViT-L/14 weights (sac+logos+ava1-l14-linearMSE). Setup: clip_path, mlp_path."""

    name = "aesthetic_laion"

    def __init__(
        self,
        clip_path: str | os.PathLike,
        mlp_path: str | os.PathLike,
        device: str | None = None,
        batch_size: int = 32,
        dtype: str | None = None,
    ) -> None:
        if not Path(mlp_path).is_file():
            raise _setup_error(self.name, "mlp_path", mlp_path, "is not a file")
        try:
            mlp = load_laion_mlp(mlp_path)
        except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as e:
            raise _setup_error(self.name, "mlp_path", mlp_path, f"does not load: {e}") from None
        super().__init__(clip_path, device, batch_size, dtype)
        dim = self.model.config.projection_dim
        if mlp.layers[0].in_features != dim:
            problem = (
                f"takes {mlp.layers[0].in_features}-dim embeddings, the CLIP model gives {dim}"
            )
            raise _setup_error(self.name, "mlp_path", mlp_path, problem)
        self.mlp = mlp.to(self.device)

    @torch.no_grad()
    def score_images(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B,) predicted aesthetic scores (fp32)."""
        return self.mlp(self.embed_images(x))

    def __call__(self, outputs: list[Any], args: list[dict], ctx: RewardContext) -> Tensor:
        return map_images(lambda x, _: self.score_images(x).cpu(), outputs, self.batch_size)


# ---------------------------------------------------------------- clip_score


def caption(prompt: Any) -> str | None:
    """An entry prompt as CLIP text: a string, or the last user turn of chat messages; else None."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
        users = [m.get("content") for m in prompt if m.get("role", "user") == "user"]
        return users[-1] if users and isinstance(users[-1], str) else None
    return None


def check_text(args: Mapping[str, Any]) -> None:
    if args.get("text") is not None and not isinstance(args["text"], str):
        raise ValueError(f"text={args['text']!r} must be a string")


@register_reward("clip_score", defaults={"text": None}, check=check_text)
class ClipScore(ClipReward):
    """scale * cos(CLIP image, CLIP text), floored at 0 by default: torchmetrics' CLIPScore
    (Hessel et al. 2021 with w = 100). Text: the per-entry arg `text`, else the entry's prompt
    (`caption`); a sample with neither scores None. Setup: clip_path (model, processor, tokenizer)."""

    name = "clip_score"

    def __init__(
        self, clip_path: str | os.PathLike, device: str | None = None, batch_size: int = 32,
        dtype: str | None = None, scale: float = 100.0, clip_negative: bool = True,
    ) -> None:  # fmt: skip
        super().__init__(clip_path, device, batch_size, dtype)
        from transformers import AutoTokenizer

        # without its files AutoTokenizer quietly builds an empty CLIP vocabulary
        problem = "has no tokenizer (tokenizer.json, or vocab.json and merges.txt)"
        if not any((self.path / f).is_file() for f in ("tokenizer.json", "vocab.json")):
            raise _setup_error(self.name, "clip_path", clip_path, problem)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError, TypeError) as e:
            raise _setup_error(self.name, "clip_path", clip_path, f"{problem}: {e}") from None
        self.max_length = self.model.config.text_config.max_position_embeddings
        self.scale, self.clip_negative = float(scale), clip_negative

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> Tensor:
        """B strings -> (B, D) L2-normalised projected CLIP text embeddings (truncated), fp32."""
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        out = self.model.get_text_features(**enc)
        emb = out if isinstance(out, Tensor) else out.pooler_output
        return F.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def score_images(self, x: Tensor, texts: list[str]) -> Tensor:
        """(B, 3, H, W) in [0, 1], B texts -> (B,) scale * cosine (floored at 0 if clip_negative)."""
        return self.score_embeddings(self.embed_images(x), texts)

    @torch.no_grad()
    def score_embeddings(self, emb: Tensor, texts: list[str]) -> Tensor:
        """(B, D) L2-normalised image embeddings, B texts -> (B,) scale * cosine (floored)."""
        cos = (emb * self.embed_texts(texts)).sum(-1)
        return (cos.clamp_min(0) if self.clip_negative else cos) * self.scale

    # what one output is and how a batch of them is scored (the video score overrides these)
    to_tensor = staticmethod(image_to_tensor)

    def score_outputs(self, x: Tensor, texts: list[str]) -> Tensor:
        return self.score_images(x, texts)

    def __call__(
        self, outputs: list[Any], args: list[dict], ctx: RewardContext
    ) -> list[float | None]:
        texts = [a.get("text") or caption(e.prompt) for a, e in zip(args, ctx.entries)]
        ok = [i for i, t in enumerate(texts) if t is not None]
        fn = lambda x, idx: self.score_outputs(x, [texts[ok[i]] for i in idx]).cpu()  # noqa: E731
        got = map_images(fn, [outputs[i] for i in ok], self.batch_size, self.to_tensor).tolist()
        out: list[float | None] = [None] * len(outputs)
        for i, v in zip(ok, got):
            out[i] = v
        return out
