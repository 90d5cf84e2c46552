"""`hpsv2`: Human Preference Score v2 / v2.1 (Wu et al. 2023, arXiv 2306.09341), an open_clip
ViT-H-14 fine-tuned on HPD v2, run on transformers' `CLIPModel` with its weights renamed.

The `hpsv2` package needs torchvision, timm-free open_clip code and a pinned pytest, so it is not
installed: `open_clip_to_clip` maps its state dict (HPS_v2_compressed.pt / HPS_v2.1_compressed.pt,
`{"state_dict": ...}`) onto CLIPModel, every source key used and every target key filled.
score = cos(image features, text features), no logit scale (hpsv2/img_score.py), about 0.2-0.35.
Preprocessing as hpsv2's `light_augmentation` eval transform: ToTensor, resize the longer side to
224 (bicubic, antialiased, on the float tensor), zero-pad to 224 x 224 centred, OpenAI mean/std.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import register_reward
from .clip import check_text
from .learned import (
    LearnedImageReward,
    ScorerSetup,
    assemble,
    check_source,
    features,
    from_pretrained,
    frozen,
    load_state_dict,
    resolve_file,
    setup_error,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
MODEL_WHAT = "an HPS_v2(.1)_compressed.pt file, a folder holding it, or the hub id xswu/HPSv2"
TOK_WHAT = "a folder or hub id with the CLIP tokenizer, e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

# ---------------------------------------------------------------- open_clip -> CLIPModel

_BLOCK = {  # open_clip ResidualAttentionBlock -> CLIPEncoderLayer (in_proj_* split into q, k, v)
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOP = {  # tensors copied as they are
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_PROJ = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
_RES = re.compile(
    r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias|in_proj_weight|in_proj_bias)$"
)


def open_clip_to_clip(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """open_clip CLIP state dict (OpenAI naming) -> transformers CLIPModel state dict.

    Raises KeyError naming any source key this mapping does not know (nothing is dropped).
    Projections are stored (width, embed) there and as Linear weights (embed, width) here.
    """
    out: dict[str, Tensor] = {}
    for key, t in sd.items():
        if key in _TOP:
            out[_TOP[key]] = t
        elif key in _PROJ:
            out[_PROJ[key]] = t.t().contiguous()
        elif m := _RES.match(key):
            visual, i, mod, param = m.groups()
            base = f"{'vision_model' if visual else 'text_model'}.encoder.layers.{i}"
            if mod == "attn" and param.startswith("in_proj_"):
                kind = param.removeprefix("in_proj_")
                for name, part in zip("qkv", t.chunk(3, dim=0)):  # in_proj rows are [q; k; v]
                    out[f"{base}.self_attn.{name}_proj.{kind}"] = part.contiguous()
            elif mod in _BLOCK:
                out[f"{base}.{_BLOCK[mod]}.{param}"] = t
            else:
                raise KeyError(f"open_clip key {key!r} has no CLIPModel counterpart")
        else:
            raise KeyError(f"open_clip key {key!r} has no CLIPModel counterpart")
    return out


def _layers(sd: Mapping[str, Tensor], prefix: str) -> int:
    depth = prefix.count(".")  # "a.b." -> the layer index is field 2
    return len({k.split(".")[depth] for k in sd if k.startswith(prefix)})


def open_clip_config(
    sd: Mapping[str, Tensor], vision_heads: int, text_heads: int, eos_token_id: int
) -> Any:
    """The CLIPConfig of an open_clip ViT state dict: sizes read from shapes; heads are not in
    the shapes, so they are given (ViT-H-14: 16 and 16). GELU, LayerNorm eps 1e-5 (open_clip's)."""
    from transformers import CLIPConfig

    conv, vpos = sd["visual.conv1.weight"], sd["visual.positional_embedding"]
    grid = math.isqrt(vpos.shape[0] - 1)
    vision = dict(
        hidden_size=conv.shape[0],
        intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_layers(sd, "visual.transformer.resblocks."),
        num_attention_heads=vision_heads,
        image_size=grid * conv.shape[-1],
        patch_size=conv.shape[-1],
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    text = dict(
        vocab_size=sd["token_embedding.weight"].shape[0],
        hidden_size=sd["token_embedding.weight"].shape[1],
        intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_layers(sd, "transformer.resblocks."),
        num_attention_heads=text_heads,
        max_position_embeddings=sd["positional_embedding"].shape[0],
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        # pooled at the first EOS: open_clip's argmax when EOS is the top id, as in CLIP's BPE
        eos_token_id=eos_token_id,
        bos_token_id=None,  # unused by CLIPModel; the default 49406 is outside small vocabularies
        pad_token_id=None,
    )
    return CLIPConfig(
        text_config=text, vision_config=vision, projection_dim=sd["text_projection"].shape[1]
    )


def load_open_clip(
    sd: Mapping[str, Tensor], vision_heads: int, text_heads: int, eos_token_id: int
) -> Any:
    """A CLIPModel holding an open_clip state dict; every target parameter filled (strict)."""
    from transformers import CLIPModel

    for name, heads, key in (
        ("vision_heads", vision_heads, "visual.conv1.weight"),
        ("text_heads", text_heads, "token_embedding.weight"),
    ):
        width = sd[key].shape[0] if name == "vision_heads" else sd[key].shape[1]
        if heads < 1 or width % heads:
            raise ValueError(f"{name}={heads} does not divide the width {width}")
    config = open_clip_config(sd, vision_heads, text_heads, eos_token_id)
    return assemble(lambda: CLIPModel(config), open_clip_to_clip(sd))


# ---------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class ResizeMaxPad:
    """hpsv2's eval transform on (B, 3, H, W) float in [0, 1]: longer side to `size` (bicubic,
    antialiased, unclamped, as torchvision resizes a float tensor), zero padding centred (extra
    pixel right/bottom), then (x - mean) / std."""

    size: int = 224
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD

    def __call__(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        scale = self.size / max(h, w)
        x = x.float()
        if scale != 1.0:
            nh, nw = round(h * scale), round(w * scale)  # ResizeMaxSize: Python round
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
            ph, pw = self.size - nh, self.size - nw
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
        mean, std = (
            torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (self.mean, self.std)
        )
        return (x - mean) / std


# ---------------------------------------------------------------- hpsv2


@register_reward("hpsv2", defaults={"text": None}, check=check_text)
class HPSv2(LearnedImageReward):
    """HPS v2 / v2.1: cos(CLIP image, CLIP text) of the HPS fine-tune. Setup: model (file, folder
    or hub id), version ("v2.0" | "v2.1": the file in a folder or hub repo), tokenizer,
    vision_heads, text_heads, device, dtype, batch_size, norm_mean, norm_std."""

    name = "hpsv2"

    def __init__(
        self, model: str | os.PathLike = "xswu/HPSv2", version: str = "v2.1",
        tokenizer: str | os.PathLike = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        vision_heads: int = 16, text_heads: int = 16, device: str | None = None,
        dtype: str | None = None, batch_size: int = 16, norm_mean: float = 0.0,
        norm_std: float = 1.0,
    ) -> None:  # fmt: skip
        setup = ScorerSetup.check(self.name, device, dtype, batch_size, norm_mean, norm_std)
        if version not in HPS_FILES:
            raise setup_error(
                self.name, "version", version, "is not an HPS version", '"v2.0" or "v2.1"'
            )
        tok_src = check_source(self.name, "tokenizer", tokenizer, TOK_WHAT)
        path = resolve_file(self.name, "model", model, HPS_FILES[version], MODEL_WHAT)
        super().__init__(setup)
        from transformers import AutoTokenizer

        self.tokenizer = from_pretrained(
            self.name, "tokenizer", tok_src, TOK_WHAT, AutoTokenizer.from_pretrained
        )
        sd = load_state_dict(self.name, "model", path, MODEL_WHAT)
        try:
            clip = load_open_clip(sd, vision_heads, text_heads, self.tokenizer.eos_token_id)
        except (KeyError, ValueError, RuntimeError) as e:
            raise setup_error(
                self.name, "model", path, f"is not an open_clip ViT: {e}", MODEL_WHAT
            ) from None
        self.model = frozen(clip, setup)
        self.preprocess = ResizeMaxPad(clip.config.vision_config.image_size)
        self.max_length = clip.config.text_config.max_position_embeddings

    @torch.no_grad()
    def score_images(self, x: Tensor, texts: list[str]) -> Tensor:
        px = self.preprocess(x.to(self.device)).to(self.dtype)
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        img = F.normalize(features(self.model.get_image_features(pixel_values=px)).float(), dim=-1)
        txt = F.normalize(features(self.model.get_text_features(**enc)).float(), dim=-1)
        return (img * txt).sum(-1)
