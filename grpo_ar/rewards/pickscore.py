"""`pickscore`: PickScore v1 (Kirstain et al. 2023, arXiv 2305.01569), a CLIP ViT-H/14 fine-tuned
on Pick-a-Pic preferences and published in transformers format.

score = logit_scale.exp() * cos(image embedding, text embedding), as the model card computes it
(about 18-24 for the released weights). Weights: `model` (yuvalkirstain/PickScore_v1 or a folder
saved with CLIPModel.save_pretrained); image processor and tokenizer: `processor`
(laion/CLIP-ViT-H-14-laion2B-s32B-b79K or a folder with preprocessor_config.json and the tokenizer).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import register_reward
from .clip import ClipPreprocess, check_text
from .learned import (
    LearnedImageReward,
    ScorerSetup,
    check_source,
    features,
    from_pretrained,
    frozen,
)

MODEL_WHAT = "a CLIPModel folder (save_pretrained) or hub id, e.g. yuvalkirstain/PickScore_v1"
PROC_WHAT = (
    "a folder or hub id with the CLIP image processor and tokenizer, "
    "e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
)


def load_clip_processor(
    reward: str, key: str, source: str, what: str
) -> tuple[ClipPreprocess, Any]:
    """(ClipPreprocess, tokenizer) from one folder or hub id."""
    from transformers import AutoImageProcessor, AutoTokenizer

    proc = from_pretrained(reward, key, source, what, AutoImageProcessor.from_pretrained)
    tok = from_pretrained(reward, key, source, what, AutoTokenizer.from_pretrained)
    return ClipPreprocess.from_processor(proc), tok


@register_reward("pickscore", defaults={"text": None}, check=check_text)
class PickScore(LearnedImageReward):
    """PickScore: logit_scale.exp() * cos(CLIP image, CLIP text). Setup: model, processor, device,
    dtype, batch_size, norm_mean, norm_std. Text: arg `text`, else the entry's prompt."""

    name = "pickscore"

    def __init__(
        self, model: str | os.PathLike = "yuvalkirstain/PickScore_v1",
        processor: str | os.PathLike = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        device: str | None = None, dtype: str | None = None, batch_size: int = 16,
        norm_mean: float = 0.0, norm_std: float = 1.0,
    ) -> None:  # fmt: skip
        setup = ScorerSetup.check(self.name, device, dtype, batch_size, norm_mean, norm_std)
        model_src = check_source(self.name, "model", model, MODEL_WHAT)
        proc_src = check_source(self.name, "processor", processor, PROC_WHAT)
        super().__init__(setup)
        from transformers import CLIPModel

        clip = from_pretrained(self.name, "model", model_src, MODEL_WHAT, CLIPModel.from_pretrained)
        self.model = frozen(clip, setup)
        self.preprocess, self.tokenizer = load_clip_processor(
            self.name, "processor", proc_src, PROC_WHAT
        )
        self.max_length = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def embed(self, x: Tensor, texts: list[str]) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) in [0, 1], B texts -> two (B, D) L2-normalised float32 embeddings."""
        px = self.preprocess(x.to(self.device)).to(self.dtype)
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        img = features(self.model.get_image_features(pixel_values=px))
        txt = features(self.model.get_text_features(**enc))
        return F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)

    @torch.no_grad()
    def score_images(self, x: Tensor, texts: list[str]) -> Tensor:
        img, txt = self.embed(x, texts)
        return self.model.logit_scale.float().exp() * (img * txt).sum(-1)
