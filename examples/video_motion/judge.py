"""The AR video example's independent judge of motion-following: a tiny 3D CNN that names the
direction a clip moves in (left, right, up, down) or "none", trained on *decoded real clips*
(procedural clips passed through the example's VQ encode/decode, the kind of pixels the
model's samples decode to). It shares nothing with the `motion` reward: no change maps, no
centroids, no velocity threshold; it learns the direction from labelled clips.

"none" is taught with two constructions from the same real clips: a still clip (one frame
repeated) and a clip whose frames are shuffled (an object that jumps about). A sample that
stands still or teleports is then not credited with a direction by chance.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from ar_common.pretraining import log_step, optimizer_step, scheduled
from torch import Tensor, nn

LABELS = ("left", "right", "up", "down", "none")
NONE = LABELS.index("none")


class DirectionJudge(nn.Module):
    """(N, F, 3, H, W) clips in [0, 1] -> (N, 5) logits over LABELS."""

    def __init__(self, width: int = 12) -> None:
        super().__init__()
        # 3x3x3 kernels see one frame step; two stride-2 stages before the pooling see the
        # whole path of a 1 px/frame object; global max pooling: position does not matter
        self.body = nn.Sequential(
            nn.Conv3d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv3d(width, 2 * width, 3, stride=(1, 2, 2), padding=1), nn.ReLU(),
            nn.Conv3d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveMaxPool3d(1), nn.Flatten(), nn.Linear(2 * width, len(LABELS)),
        )  # fmt: skip

    def forward(self, clips: Tensor) -> Tensor:
        # each clip standardised (one mean and std over all its pixels): colour and brightness
        # carry no direction, and a faded sample is judged by its motion alone
        f = clips.flatten(1)
        x = (clips - f.mean(1).view(-1, 1, 1, 1, 1)) / (f.std(1).view(-1, 1, 1, 1, 1) + 0.02)
        return self.body(x.transpose(1, 2))  # (N, 3, F, H, W) for Conv3d

    @torch.no_grad()
    def labels(self, clips: Tensor, batch: int = 256) -> list[str]:
        """(N, F, 3, H, W) -> one of LABELS per clip."""
        self.eval()
        idx = torch.cat(
            [self(clips[i : i + batch]).argmax(-1) for i in range(0, len(clips), batch)]
        )
        return [LABELS[i] for i in idx.tolist()]


def with_none(clips: Tensor, direction: Tensor, g: torch.Generator,
              frac: float = 0.2) -> tuple[Tensor, Tensor]:  # fmt: skip
    """A `frac` of the clips made direction-less, label NONE: half of them a still clip (one of
    their frames repeated), half their frames shuffled. -> (clips, labels)."""
    n, f = clips.shape[:2]
    clips, labels = clips.clone(), direction.clone()
    pick = (torch.rand(n, generator=g) < frac).nonzero().flatten()
    for k, i in enumerate(pick.tolist()):
        if k % 2 == 0:
            frame = int(torch.randint(0, f, (1,), generator=g))
            clips[i] = clips[i, frame].expand_as(clips[i])
        else:
            clips[i] = clips[i, torch.randperm(f, generator=g)]
        labels[i] = NONE
    return clips, labels


def train_judge(clips: Tensor, direction: Tensor, steps: int, batch_size: int, lr: float,
                seed: int, width: int = 12, verbose: bool = True) -> tuple[DirectionJudge, dict]:  # fmt: skip
    """Cross-entropy on (N, F, 3, H, W) decoded real clips with their true `direction` (the
    motion they show, not their noisy caption), a fifth of each batch made direction-less."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = DirectionJudge(width).train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = scheduled(opt, steps)
    t0 = time.perf_counter()
    for step in range(steps):
        i = torch.randint(0, len(clips), (batch_size,), generator=g)
        x, y = with_none(clips[i], direction[i], g)
        loss = F.cross_entropy(net(x), y)
        optimizer_step(opt, sched, loss)
        log_step(verbose, "judge", step, steps, 100, loss, t0)
    return net.eval(), {"seconds": round(time.perf_counter() - t0, 1), "loss": loss.item()}


def judge_accuracy(judge: DirectionJudge, clips: Tensor, direction: Tensor,
                   seed: int) -> dict[str, float]:  # fmt: skip
    """Accuracy on real clips (direction as rendered) and on their direction-less versions."""
    g = torch.Generator().manual_seed(seed)
    got = judge.labels(clips)
    moving = sum(a == LABELS[d] for a, d in zip(got, direction.tolist())) / len(clips)
    x, y = with_none(clips, direction, g, frac=1.0)
    still = sum(a == "none" for a in judge.labels(x)) / len(x)
    return {"moving": round(moving, 4), "none": round(still, 4), "n": len(clips)}


def measure_judge(judge: DirectionJudge, make: Any, decode: Any, seed: int,
                  held: list[str], n: int = 512) -> dict[str, Any]:  # fmt: skip
    """The judge on fresh real clips it never saw (render seed `seed`): on all 32 prompts and on
    the held-out prompts alone, as raw pixels and through the VQ (`decode`: clips -> decoded
    clips); `make(n, seed, prompts)` renders clips."""
    out: dict[str, Any] = {}
    for name, prompts in (("all", None), ("heldout", held)):
        data = make(n, seed, prompts)
        out[f"{name}/vq"] = judge_accuracy(judge, decode(data["clips"]), data["direction"], seed)
        out[f"{name}/pixels"] = judge_accuracy(judge, data["clips"], data["direction"], seed)
    return out
