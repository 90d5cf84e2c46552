"""The example's adapter and reward, registered as `plan_image` (model.adapter and a reward name).

`PlanImageAdapter`: a completion of typed spans (`[[sampling.spans]]`, generation/spans.py): a
text plan span, then the span named "image" holding the h·w codes. Sampling and teacher-forced
log-probs are the library's span sampler and scorer (each span under its own transform); this
adapter only splits a completion into its plan text and its image, and decodes the image span
alone to pixels. Rewards receive `{"plan": "red circle", "image": <image>}` per sample.

`PlanImageReward`: prompt constraint (a classifier finds a colour and a shape inside the prompt's
families) + plan-image consistency (it finds the plan's colour and shape) + `aesthetic_proxy`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ (see run.py)
from image_aesthetic.pretrain import ShapeClassifier  # noqa: E402
from plan_then_image.plans import read_plan, satisfies  # noqa: E402

from grpo_ar.adapters.base import Adapter  # noqa: E402
from grpo_ar.adapters.codes import to_pil, to_uint8  # noqa: E402
from grpo_ar.adapters.image import ImageAdapter  # noqa: E402
from grpo_ar.adapters.registry import build_code_grid, register_adapter  # noqa: E402
from grpo_ar.config.modality import ImageConfig  # noqa: E402
from grpo_ar.errors import ConfigError  # noqa: E402
from grpo_ar.generation.params import SamplingParams  # noqa: E402
from grpo_ar.rewards.base import RewardContext, register_reward  # noqa: E402
from grpo_ar.rewards.proxy import aesthetic_proxy_score  # noqa: E402
from grpo_ar.types import Entry, PromptBatch, Rollout  # noqa: E402

IMAGE_SPAN = "image"


class PlanImageAdapter(Adapter):
    """Plan span(s), then the "image" span of `image.layout.num_tokens` codes; no CFG."""

    def __init__(self, image: ImageAdapter, sampling: SamplingParams, tokenizer: Any) -> None:
        names = [s.name for s in sampling.spans]
        if IMAGE_SPAN not in names or names[-1] != IMAGE_SPAN:
            raise ConfigError(
                f"sampling.spans {names}: the last span must be named {IMAGE_SPAN!r} (the codes "
                "the VQ decodes); add [[sampling.spans]] name = 'image' after the plan"
            )
        span, n, (lo, hi) = sampling.spans[-1], image.layout.num_tokens, image.layout.code_range
        if n != image.layout.num_codes:
            raise ConfigError("the plan-then-image adapter takes no EOL/EOF layout tokens")
        if span.length != n:
            raise ConfigError(
                f"span 'image' has length={span.length}; the {image.layout.grid} grid needs "
                f"length = {n}"
            )
        if not span.allowed_ranges or any(a < lo or b > hi for a, b in span.allowed_ranges):
            raise ConfigError(
                f"span 'image' allows {list(span.allowed_ranges)}: give ranges inside the "
                f"codebook [{lo}, {hi}), e.g. allowed_ranges = [[{lo}, {hi}]]"
            )
        fixed = sum(s.length for s in sampling.spans)
        if sampling.max_new_tokens < fixed:
            raise ConfigError(
                f"sampling.max_new_tokens={sampling.max_new_tokens} is shorter than the spans' "
                f"lengths ({fixed}); set it to at least {fixed}"
            )
        if sampling.uses_cfg:
            raise ConfigError("typed spans sample without CFG: set sampling.cfg_scale = 1")
        super().__init__(sampling)
        self.image, self.tokenizer = image, tokenizer
        self.image_index = len(names) - 1

    def encode(self, entries: Sequence[Entry]) -> PromptBatch:
        return self.image.encode(entries)  # the text condition (no CFG branch)

    def image_ids(self, rollout: Rollout) -> Tensor:
        """(N, h·w) LM ids of the image span of each row; refuses a row whose image span was
        cut by the token budget."""
        if rollout.span_ids is None:
            raise ValueError("the rollout has no span_ids: sample it with this adapter")
        sel = (rollout.span_ids == self.image_index) & rollout.completion_mask.bool()  # (N, T)
        n = self.image.layout.num_tokens
        short = (sel.sum(1) != n).nonzero().flatten().tolist()
        if short:
            raise ValueError(
                f"rows {short[:5]} hold fewer than {n} image tokens (the budget ended inside an "
                "earlier span): raise sampling.max_new_tokens or shorten the plan span"
            )
        return rollout.completion_ids[sel].view(-1, n)  # row-major: each row's tokens in order

    def plans(self, rollout: Rollout) -> list[str]:
        """The words of every span before the image, one string per row."""
        assert rollout.span_ids is not None  # image_ids refuses rollouts without spans
        sel = (rollout.span_ids != self.image_index) & rollout.completion_mask.bool()
        return [
            " ".join(self.tokenizer.convert_ids_to_tokens(ids[m].tolist()))
            for ids, m in zip(rollout.completion_ids, sel)
        ]

    def decode_pixels(self, rollout: Rollout) -> Tensor:
        """(N, 3, H, W) float pixels in [0, 1] of the image span alone."""
        return self.image.decode_codes(self.image.layout.to_codes(self.image_ids(rollout)))

    def decode(self, rollout: Rollout) -> list[Any]:
        unit = self.decode_pixels(rollout)
        kind = self.image.output
        images = list(unit) if kind == "float" else list(to_uint8(unit))
        if kind == "pil":
            images = to_pil(to_uint8(unit))
        return [{"plan": p, "image": x} for p, x in zip(self.plans(rollout), images)]

    def summarize(self, output: Any) -> dict[str, Any]:
        return {"plan": output["plan"], **self.image.summarize(output["image"])}

    def save_samples(self, outputs: Sequence[Any], directory: str | Path) -> list[Path]:
        """The images as PNGs named after their plans (`sample_000_red_circle.png`)."""
        paths = self.image.save_samples([o["image"] for o in outputs], directory)
        named = []
        for p, o in zip(paths, outputs):
            plan = "_".join(w for w in o["plan"].split() if w.isalnum()) or "noplan"
            named.append(p.rename(p.with_name(f"{p.stem}_{plan}.png")))
        return named


@register_adapter("plan_image", ImageConfig)
def build_plan_image(config: Any, section: ImageConfig, device: str,
                     dtype: torch.dtype) -> tuple[Any, PlanImageAdapter]:  # fmt: skip
    """The [plan_image] table is an [image] table (text condition); the image span's length is
    the grid's token count."""
    if section.condition != "text":
        raise ConfigError("plan_image.condition must be 'text' (the plan words need a tokenizer)")
    if section.output != "float":
        raise ConfigError("plan_image.output must be 'float' (the plan_image reward reads floats)")
    spans = config.sampling.spans
    n = spans[-1].length if spans else 0
    # the image adapter alone: its fixed-length grid, the spans' transforms are not its own
    alone = replace(config.sampling, spans=(), max_new_tokens=n or 64, allowed_ranges=())
    model, image = build_code_grid(replace(config, sampling=alone), section, device, dtype)
    return model, PlanImageAdapter(image, config.sampling, image.condition.tokenizer)


def plan_image_scores(classifier: ShapeClassifier, outputs: list[dict], prompts: list[str],
                      weights: Sequence[float] = (1.0, 1.0, 1.0)) -> dict[str, Tensor]:  # fmt: skip
    """(N,) scores of {"plan", "image" (3, H, W) float} outputs for their prompts: `constraint`
    (the classifier's colour and shape lie in the prompt's families), `consistency` (they are
    the plan's), `plan_valid` (the plan itself lies in the families), `aesthetic` (proxy) and
    `reward` = weights · (constraint, consistency, aesthetic)."""
    x = torch.stack([o["image"] for o in outputs]).float()  # (N, 3, H, W)
    with torch.no_grad():
        c_logits, s_logits = classifier.eval()(x)
    colour, shape = c_logits.argmax(-1).tolist(), s_logits.argmax(-1).tolist()
    plans = [read_plan(o["plan"].split()) for o in outputs]
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    out = {
        "constraint": t([satisfies(p, c, s) for p, c, s in zip(prompts, colour, shape)]),
        "consistency": t([pl == (c, s) for pl, c, s in zip(plans, colour, shape)]),
        "plan_valid": t([pl is not None and satisfies(p, *pl) for p, pl in zip(prompts, plans)]),
        "aesthetic": aesthetic_proxy_score(x, torch.ones(5)),
    }
    w = t(list(weights))
    out["reward"] = torch.stack([out["constraint"], out["consistency"], out["aesthetic"]], 1) @ w
    return out


@register_reward("plan_image", defaults={})
class PlanImageReward:
    """constraint + consistency + aesthetic_proxy (weights w_constraint, w_consistency,
    w_aesthetic), the classifier at `classifier_path` (a ShapeClassifier's safetensors)."""

    def __init__(self, classifier_path: str, w_constraint: float = 1.0,
                 w_consistency: float = 1.0, w_aesthetic: float = 1.0) -> None:  # fmt: skip
        from safetensors.torch import load_file

        self.classifier = ShapeClassifier()
        self.classifier.load_state_dict(load_file(classifier_path))
        self.classifier.eval().requires_grad_(False)
        self.weights = (w_constraint, w_consistency, w_aesthetic)

    def __call__(self, outputs: list[Any], args: list[dict], ctx: RewardContext) -> Tensor:
        prompts = [str(e.prompt) for e in ctx.entries]
        return plan_image_scores(self.classifier, outputs, prompts, self.weights)["reward"]
