"""Video rewards: `temporal_consistency`, `motion`, `per_frame` (any image reward, pooled over
frames) and `clip_video_score` (CLIP, local weights).

A clip is what `VideoAdapter.decode` gives, frames `(F, H, W, 3)` uint8 or `(F, 3, H, W)` float
in [0, 1], or any sequence of frames `image_to_tensor` reads (PIL images, arrays); `clip_to_tensor`
makes it `(F, 3, H, W)` float32. Every scorer runs batched under no-grad, clips of one size at a
time (`map_clips`). Directions are in image coordinates: x to the right, y DOWN.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import REWARDS, RewardContext, RewardFn, RewardRegistry, register_reward
from .clip import ClipScore, check_text
from .pixels import image_to_tensor, map_images


def clip_to_tensor(clip: Any) -> Tensor:
    """One clip -> (F, 3, H, W) float32 in [0, 1]: uint8 (F, H, W, 3), float (F, 3, H, W), or a
    sequence of frames of one size (PIL, uint8 (H, W, 3), float (3, H, W))."""
    x = torch.from_numpy(np.asarray(clip)) if isinstance(clip, np.ndarray) else clip
    if isinstance(x, Tensor) and x.ndim == 4:
        if x.dtype == torch.uint8 and x.shape[-1] == 3:
            return x.permute(0, 3, 1, 2).float() / 255
        if x.is_floating_point() and x.shape[1] == 3:
            return x.detach().float().clamp(0, 1)
        raise ValueError(
            f"a clip is (F, H, W, 3) uint8 or (F, 3, H, W) float, got {x.dtype} {tuple(x.shape)}"
        )
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        raise TypeError(f"expected a clip (tensor, array or list of frames), got {type(clip)}")
    frames = [image_to_tensor(f) for f in x]
    if not frames or len({tuple(f.shape) for f in frames}) > 1:
        raise ValueError("a clip needs at least one frame, all of one size")
    return torch.stack(frames)


def map_clips(
    fn: Callable[[Tensor, list[int]], Tensor], outputs: Sequence[Any], batch_size: int = 16
) -> Tensor:
    """`fn(x (b, F, 3, H, W), idx) -> (b, ...)` over same-size chunks of <= batch_size clips."""
    return map_images(fn, outputs, batch_size, clip_to_tensor)


def _need_frames(x: Tensor, n: int, what: str) -> None:
    if x.shape[1] < n:
        raise ValueError(f"{what} needs clips of at least {n} frames, got {x.shape[1]}")


# ---------------------------------------------------------------- temporal_consistency


def consistency_terms(x: Tensor) -> tuple[Tensor, Tensor]:
    """(B, F, 3, H, W) in [0, 1] -> (B,) similarity and (B,) flicker.

    similarity: 1 − mean |x_{t+1} − x_t| over pixels, channels and the F − 1 steps (1 = static).
    flicker: mean over the F − 2 step pairs of sqrt(relu(−d_t · d_{t+1})), d_t = x_{t+1} − x_t:
      the size of a change that is undone at the next step (up then down). An object moving
      steadily changes each pixel once in one direction (no reversal); jitter, flashing and
      frame-independent noise reverse (0 for F < 3).
    """
    _need_frames(x, 2, "temporal_consistency")
    d = x[:, 1:].double() - x[:, :-1].double()  # (B, F-1, 3, H, W)
    sim = 1 - d.abs().mean((1, 2, 3, 4))
    if x.shape[1] < 3:
        return sim.float(), torch.zeros_like(sim).float()
    rev = (-(d[:, 1:] * d[:, :-1])).clamp_min(0).sqrt()
    return sim.float(), rev.mean((1, 2, 3, 4)).float()


def _number(name: str, lo: float, inclusive: bool = True) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or (v < lo if inclusive else v <= lo):
            raise ValueError(
                f"{name}={v!r} must be a finite number {'>=' if inclusive else '>'} {lo}"
            )

    return check


def _check_consistency(args: Mapping[str, Any]) -> None:
    _number("flicker_weight", 0.0)(args.get("flicker_weight", 1.0))


@register_reward("temporal_consistency", defaults={"flicker_weight": 1.0}, check=_check_consistency)
@torch.no_grad()
def temporal_consistency(outputs: list[Any], args: list[dict], ctx: RewardContext) -> Tensor:
    """similarity − flicker_weight · flicker (`consistency_terms`): 1 for a still clip, a little
    less for smooth motion, lower for flicker and jitter. At most 1; needs >= 2 frames."""
    w = torch.tensor([float(a.get("flicker_weight", 1.0)) for a in args])

    def score(x: Tensor, idx: list[int]) -> Tensor:
        sim, flicker = consistency_terms(x)
        return sim - w[idx] * flicker

    return map_clips(score, outputs)


# ---------------------------------------------------------------- motion

DIRECTIONS = {
    "right": (1.0, 0.0),
    "left": (-1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up_right": (1.0, -1.0),
    "up_left": (-1.0, -1.0),
    "down_right": (1.0, 1.0),
    "down_left": (-1.0, 1.0),
    "none": (0.0, 0.0),
}
"""Direction names -> (dx, dy) in image coordinates (y down); "none" = the object stays put."""


def direction_vector(direction: Any) -> tuple[float, float]:
    """A direction name ("left", "up-right", "none", ...) or an angle in degrees
    (counter-clockwise from the right, so 90 = up) -> unit (dx, dy), y down; (0, 0) for none."""
    if isinstance(direction, str):
        key = direction.strip().lower().replace("-", "_").replace(" ", "_")
        if key in ("still", "static", "stay"):
            key = "none"
        if key not in DIRECTIONS:
            raise ValueError(
                f"direction={direction!r}: use one of {', '.join(DIRECTIONS)} or an angle in degrees"
            )
        dx, dy = DIRECTIONS[key]
    elif isinstance(direction, numbers.Real) and not isinstance(direction, bool):
        if not math.isfinite(direction):
            raise ValueError(f"direction={direction!r} must be finite")
        dx, dy = math.cos(math.radians(direction)), -math.sin(math.radians(direction))
    else:
        raise ValueError(f"direction={direction!r}: a name such as 'left' or degrees")
    n = math.hypot(dx, dy)
    return (dx / n, dy / n) if n else (0.0, 0.0)


def estimate_motion(x: Tensor, noise_floor: float = 0.05) -> tuple[Tensor, Tensor]:
    """(B, F, 3, H, W) in [0, 1] -> (B, 2) velocity (dx, dy) of the dominant moving object, in
    frame sizes (the larger side) per frame, y down; and (B,) the fraction of steps that moved.

    Change maps m_t = |x_{t+1} − x_t| summed over channels, minus their per-step median (VQ
    texture noise over the whole frame) and `noise_floor`, clamped at 0: the leading and
    trailing edges of what moved. Their centroid lies near the object's centre between t and
    t + 1 whatever its speed; the velocity is the least-squares slope of those centroids over
    the steps that moved (weighted by the change mass). A still clip gives (0, 0).
    """
    _need_frames(x, 3, "motion")
    b, f, _, h, w = x.shape
    m = (x[:, 1:].double() - x[:, :-1].double()).abs().sum(2)  # (B, F-1, H, W)
    m = (m - m.flatten(2).median(-1).values[..., None, None] - noise_floor).clamp_min(0)
    mass = m.sum((2, 3))  # (B, F-1)
    side = float(max(h, w))
    ys = (torch.arange(h, dtype=m.dtype) + 0.5) / side
    xs = (torch.arange(w, dtype=m.dtype) + 0.5) / side
    safe = mass.clamp_min(1e-12)
    cx = (m.sum(2) * xs).sum(-1) / safe  # (B, F-1)
    cy = (m.sum(3) * ys).sum(-1) / safe
    moved = mass > 1e-6 * h * w
    wt = moved.double() * mass
    t = torch.arange(f - 1, dtype=m.dtype).expand(b, -1)
    wsum = wt.sum(1).clamp_min(1e-12)
    tc = t - ((wt * t).sum(1) / wsum)[:, None]
    var = (wt * tc**2).sum(1)
    ok = (moved.sum(1) >= 2) & (var > 0)
    slope = lambda c: torch.where(ok, (wt * tc * c).sum(1) / var.clamp_min(1e-12), 0.0)  # noqa: E731
    v = torch.stack([slope(cx), slope(cy)], 1)
    return v.float(), (moved.double().mean(1)).float()


def motion_score(
    v: Tensor, direction: Tensor, speed: Tensor | None = None, min_speed: float = 0.02
) -> Tensor:
    """(B, 2) velocities, (B, 2) unit target directions ((0, 0) = stay still), (B,) target
    speeds (NaN = any) -> (B,) rewards in [-1, 1].

    No speed: (v · u) / max(|v|, min_speed): the cosine to the target once the object moves at
      least min_speed (frame sizes per frame), scaled down below that; 1 = the right way.
    Speed s: 1 − |v − s·u| / s: 1 at the target velocity, 0 standing still, −1 going the other
      way at speed s.
    Still (u = 0): 1 − |v| / min_speed.
    """
    norm = v.norm(dim=-1)
    dot = (v * direction).sum(-1)
    r = dot / norm.clamp_min(min_speed)
    if speed is not None:
        s = speed.to(v)
        has = torch.isfinite(s) & (s > 0)
        err = (v - torch.where(has, s, 1.0)[:, None] * direction).norm(dim=-1)
        r = torch.where(has, 1 - err / torch.where(has, s, 1.0), r)
    still = direction.norm(dim=-1) == 0
    r = torch.where(still, 1 - norm / min_speed, r)
    return r.clamp(-1, 1)


def motion_label(v: Tensor, min_speed: float = 0.02) -> list[str]:
    """(B, 2) velocities -> the nearest of the 8 compass names in DIRECTIONS, or "none" below
    min_speed (for accuracy metrics of motion-following)."""
    names = [k for k in DIRECTIONS if k != "none"]
    dirs = F.normalize(torch.tensor([DIRECTIONS[k] for k in names]), dim=-1)
    best = (v.float() @ dirs.t()).argmax(-1).tolist()
    return [names[i] if float(n) >= min_speed else "none" for i, n in zip(best, v.norm(dim=-1))]


def _check_motion(args: Mapping[str, Any]) -> None:
    direction_vector(args["direction"])
    if args.get("speed") is not None:
        _number("speed", 0.0, inclusive=False)(args["speed"])
    _number("min_speed", 0.0, inclusive=False)(args.get("min_speed", 0.02))
    _number("noise_floor", 0.0)(args.get("noise_floor", 0.05))


@register_reward(
    "motion",
    required=("direction",),
    defaults={"speed": None, "min_speed": 0.02, "noise_floor": 0.05},
    check=_check_motion,
)
@torch.no_grad()
def motion(outputs: list[Any], args: list[dict], ctx: RewardContext) -> Tensor:
    """Verifiable motion reward in [-1, 1] for prompts like "the ball moves left": per-entry
    args `direction` (name or degrees, see `direction_vector`), optional `speed` (frame sizes
    per frame) and `min_speed`; the dominant object's motion from `estimate_motion`, scored by
    `motion_score`. Needs >= 3 frames."""
    u = torch.tensor([direction_vector(a["direction"]) for a in args])
    s = torch.tensor([math.nan if a.get("speed") is None else float(a["speed"]) for a in args])
    lo = [float(a.get("min_speed", 0.02)) for a in args]
    floor = [float(a.get("noise_floor", 0.05)) for a in args]

    def score(x: Tensor, idx: list[int]) -> Tensor:
        out = torch.empty(len(idx))
        for key in sorted({(lo[i], floor[i]) for i in idx}):  # usually one setting
            rows = [j for j, i in enumerate(idx) if (lo[i], floor[i]) == key]
            v, _ = estimate_motion(x[rows], key[1])
            sel = [idx[j] for j in rows]
            out[rows] = motion_score(v, u[sel], s[sel], key[0])
        return out

    return map_clips(score, outputs)


# ---------------------------------------------------------------- per_frame


def _pool(vals: Tensor, pool: str) -> Tensor:
    """(F,) frame scores (NaN = failed) -> a scalar: a failed frame fails the clip."""
    if torch.isnan(vals).any():
        return torch.tensor(math.nan)
    return vals.mean() if pool == "mean" else vals.min()


def per_frame(
    fn: RewardFn,
    pool: Literal["mean", "min"] = "mean",
    frames: Literal["float", "uint8", "pil"] = "float",
) -> RewardFn:
    """A video reward from an image reward `fn(outputs, args, ctx)`: `fn` scores every frame
    of every clip in one call (frames as (3, H, W) floats, (H, W, 3) uint8 or PIL images; each
    frame gets its clip's args, entry and group), and each clip gets the mean or the min
    (the worst frame) of its frames. A frame that fails fails its clip."""
    if pool not in ("mean", "min"):
        raise ValueError(f"pool={pool!r}: use 'mean' or 'min'")
    if frames not in ("float", "uint8", "pil"):
        raise ValueError(f"frames={frames!r}: use 'float', 'uint8' or 'pil'")

    def reward(outputs: list[Any], args: list[dict], ctx: RewardContext) -> Tensor:
        clips = [clip_to_tensor(c) for c in outputs]
        counts = [c.shape[0] for c in clips]
        flat: list[Any] = [f for c in clips for f in c]
        if frames != "float" and flat:
            u8 = [(f * 255).round().to(torch.uint8).permute(1, 2, 0) for f in flat]
            flat = u8 if frames == "uint8" else _to_pil(u8)
        rep = lambda xs: [x for x, n in zip(xs, counts) for _ in range(n)]  # noqa: E731
        same = len(set(counts)) == 1 and counts
        fctx = RewardContext(
            rep(ctx.entries),
            rep(ctx.group_ids),
            ctx.group_size * counts[0] if same else ctx.group_size,
            ctx.step,
            None,
        )
        raw = fn(flat, rep(args), fctx)
        vals = torch.tensor(
            [math.nan if v is None else float(v) for v in _as_list(raw)], dtype=torch.float64
        )
        if vals.numel() != len(flat):
            raise ValueError(f"the image reward gave {vals.numel()} scores for {len(flat)} frames")
        parts = vals.split(counts)
        return torch.stack([_pool(p, pool) for p in parts]).float() if parts else torch.zeros(0)

    reward.__name__ = f"per_frame_{pool}({getattr(fn, '__name__', 'reward')})"
    return reward


def _as_list(raw: Any) -> list[Any]:
    return raw.detach().cpu().reshape(-1).tolist() if isinstance(raw, Tensor) else list(raw)


def _to_pil(frames: list[Tensor]) -> list[Any]:
    from PIL import Image

    return [Image.fromarray(f.numpy()) for f in frames]


@register_reward("per_frame", defaults=None)
class PerFrame:
    """A registered image reward on every frame, pooled per clip (`per_frame`). Setup: `reward`
    (its registry name), `pool` (mean | min), `frames` (float | uint8 | pil), `setup` (that
    reward's constructor kwargs, or default args of a function reward). Per-entry args go to
    the image reward and are checked as its own."""

    def __init__(
        self,
        reward: str = "aesthetic_proxy",
        pool: Literal["mean", "min"] = "mean",
        frames: Literal["float", "uint8", "pil"] = "float",
        setup: Mapping[str, Any] | None = None,
        registry: RewardRegistry = REWARDS,
    ) -> None:
        if reward == "per_frame" or reward not in registry:
            valid = ", ".join(sorted(k for k in registry if k != "per_frame"))
            raise ValueError(f"per_frame: reward={reward!r} is not an image reward; one of {valid}")
        self.rdef = registry[reward]
        setup = dict(setup or {})
        if self.rdef.is_class:
            inner, self.default_args = self.rdef.obj(**setup), {}
        else:
            inner, self.default_args = self.rdef.obj, {**self.rdef.setup_defaults, **setup}
            self.rdef.check_args(self.default_args, "reward setup of 'per_frame'", partial=True)
        self.inner = inner
        self.fn = per_frame(inner, pool, frames)

    def check_args(self, args: Mapping[str, Any]) -> None:
        self.rdef.check_args({**self.default_args, **args}, "per_frame")
        check = getattr(self.inner, "check_args", None)
        if check is not None:
            check(args)

    def __call__(
        self, outputs: list[Any], args: list[dict], ctx: RewardContext
    ) -> Sequence[float | None] | Tensor:
        return self.fn(outputs, [{**self.default_args, **a} for a in args], ctx)

    def on_iteration_end(self, step: int) -> None:
        hook = getattr(self.inner, "on_iteration_end", None)
        if hook is not None:
            hook(step)


# ---------------------------------------------------------------- clip_video_score


@register_reward("clip_video_score", defaults={"text": None}, check=check_text)
class ClipVideoScore(ClipScore):
    """scale · cos(mean of the L2-normalised CLIP frame embeddings, CLIP text), floored at 0
    by default (`clip_score` over a clip). Text: the per-entry arg `text`, else the entry's
    prompt. Setup as `clip_score` (clip_path, ...); batch_size counts frames."""

    name = "clip_video_score"
    to_tensor = staticmethod(clip_to_tensor)  # type: ignore[assignment]  # param named clip

    @torch.no_grad()
    def embed_clips(self, x: Tensor) -> Tensor:
        """(B, F, 3, H, W) in [0, 1] -> (B, D) L2-normalised mean frame embedding."""
        flat = x.flatten(0, 1)
        emb = torch.cat([self.embed_images(c) for c in flat.split(self.batch_size)])
        return F.normalize(emb.view(*x.shape[:2], -1).mean(1), dim=-1)

    def score_outputs(self, x: Tensor, texts: list[str]) -> Tensor:
        return self.score_embeddings(self.embed_clips(x), texts)


__all__ = [
    "DIRECTIONS",
    "ClipVideoScore",
    "PerFrame",
    "clip_to_tensor",
    "consistency_terms",
    "direction_vector",
    "estimate_motion",
    "map_clips",
    "motion",
    "motion_label",
    "motion_score",
    "per_frame",
    "temporal_consistency",
]
