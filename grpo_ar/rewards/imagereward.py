"""`imagereward`: ImageReward v1.0 (Xu et al. 2023, arXiv 2304.05977): BLIP's ViT-L image encoder,
BLIP's BERT text encoder cross-attending to the image, and a 5-linear MLP on the [CLS] state,
standardised with the paper's mean/std. Run on transformers' `BlipVisionModel` + `BlipTextModel`.

The `image-reward` package pins timm 0.6.13 and fairscale and imports torchvision, so it is not
installed: `imagereward_to_hf` maps ImageReward.pt's keys (`blip.visual_encoder.*` timm ViT,
`blip.text_encoder.*` med.py BERT, `mlp.layers.*`) onto those classes, each key used or listed as
unused with the reason. Preprocessing as ImageReward's `_transform(224)`: PIL bicubic resize of
the short side, torchvision CenterCrop (offsets rounded, not floored), OpenAI mean/std. Text: the
bert-base-uncased tokenizer, padded to 35 tokens (ImageReward.score).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .base import register_reward
from .clip import ClipPreprocess, LaionAestheticMLP, check_text
from .hps import OPENAI_MEAN, OPENAI_STD
from .learned import (
    LearnedImageReward,
    ScorerSetup,
    assemble,
    check_source,
    from_pretrained,
    frozen,
    load_state_dict,
    resolve_file,
    setup_error,
)

IR_MEAN, IR_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py: (r - mean) / std
MAX_TOKENS = 35  # ImageReward.score: padding="max_length", truncation, max_length=35
MODEL_WHAT = (
    "an ImageReward.pt (or .safetensors) file, a folder holding ImageReward.pt, "
    "or THUDM/ImageReward"
)
TOK_WHAT = "a folder or hub id with a BERT tokenizer, e.g. bert-base-uncased"

# ---------------------------------------------------------------- ImageReward.pt -> transformers

_VIT_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VIT_BLOCK = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv",
              "attn.proj": "self_attn.projection",
              "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}  # fmt: skip
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_ITC = "BLIP's image-text contrastive projection; ImageReward.score does not use it"
UNUSED = {  # in ImageReward.pt, not on the scoring path
    "blip.vision_proj.": _ITC,
    "blip.text_proj.": _ITC,
    "blip.text_encoder.embeddings.position_ids": "a buffer (0..511), rebuilt by BlipTextEmbeddings",
}


def imagereward_to_hf(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """ImageReward state dict -> (ImageRewardModel state dict, keys left out on purpose: UNUSED).

    Raises KeyError naming any key this mapping does not know; the text encoder's names are
    transformers' already (BlipText* was ported from BLIP's med.py)."""
    out: dict[str, Tensor] = {}
    unused: list[str] = []
    for key, t in sd.items():
        if any(key.startswith(p) for p in UNUSED):
            if key.endswith("position_ids") and not torch.equal(
                t.flatten(), torch.arange(t.numel())
            ):
                raise KeyError(
                    f"{key} is not 0..{t.numel() - 1}; this mapping assumes absolute positions"
                )
            unused.append(key)
        elif key.startswith("blip.text_encoder."):
            out["text_encoder." + key.removeprefix("blip.text_encoder.")] = t
        elif key.startswith("mlp.layers."):
            out[key] = t
        elif key.startswith("blip.visual_encoder."):
            rest = key.removeprefix("blip.visual_encoder.")
            if rest in _VIT_TOP:
                out["vision_model." + _VIT_TOP[rest]] = t
            elif (m := _BLOCK.match(rest)) and m[2] in _VIT_BLOCK:
                out[f"vision_model.encoder.layers.{m[1]}.{_VIT_BLOCK[m[2]]}.{m[3]}"] = t
            else:
                raise KeyError(f"ImageReward key {key!r} has no BlipVisionModel counterpart")
        else:
            raise KeyError(f"ImageReward key {key!r} has no counterpart")
    return out, unused


def _count(sd: Mapping[str, Tensor], pattern: str) -> int:
    return len({m[1] for k in sd if (m := re.match(pattern, k))})


def imagereward_configs(
    sd: Mapping[str, Tensor], vision_heads: int, text_heads: int
) -> tuple[Any, Any]:
    """(BlipVisionConfig, BlipTextConfig) read from ImageReward state dict shapes; heads are not
    in the shapes (ViT-L: 16, BERT-base: 12). LayerNorm eps: timm ViT 1e-6, BERT 1e-12."""
    from transformers import BlipTextConfig, BlipVisionConfig

    v = "blip.visual_encoder."
    width, patch = sd[v + "cls_token"].shape[-1], sd[v + "patch_embed.proj.weight"].shape[-1]
    vision = BlipVisionConfig(
        hidden_size=width, intermediate_size=sd[v + "blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count(sd, r"^blip\.visual_encoder\.blocks\.(\d+)\."),
        num_attention_heads=vision_heads, patch_size=patch, layer_norm_eps=1e-6,
        image_size=math.isqrt(sd[v + "pos_embed"].shape[1] - 1) * patch, hidden_act="gelu",
    )  # fmt: skip
    t = "blip.text_encoder."
    words = sd[t + "embeddings.word_embeddings.weight"]
    text = BlipTextConfig(
        vocab_size=words.shape[0], hidden_size=words.shape[1], encoder_hidden_size=width,
        intermediate_size=sd[t + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=_count(sd, r"^blip\.text_encoder\.encoder\.layer\.(\d+)\."),
        num_attention_heads=text_heads, layer_norm_eps=1e-12, hidden_act="gelu",
        max_position_embeddings=sd[t + "embeddings.position_embeddings.weight"].shape[0],
        pad_token_id=0, bos_token_id=None, eos_token_id=None, sep_token_id=None,
        is_decoder=True,  # builds the cross-attention layers; forward runs bidirectionally
    )  # fmt: skip
    return vision, text


class ImageRewardModel(nn.Module):
    """ImageReward's scoring path: image tokens -> BERT with cross-attention -> MLP([CLS])."""

    def __init__(self, vision_config: Any, text_config: Any, mlp_dims: tuple[int, ...]) -> None:
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = LaionAestheticMLP(mlp_dims)  # same layout: Linear/Dropout x3, Linear, Linear

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, 3, S, S), (B, T), (B, T) -> (B,) raw head output (before IR_MEAN / IR_STD), fp32."""
        image = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, 1 + P, Dv)
        ones = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        text = self.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
            encoder_attention_mask=ones, is_decoder=False,
        ).last_hidden_state  # (B, T, Dt)  # fmt: skip
        return self.mlp(text[:, 0].float())  # the head stays fp32, as ImageReward casts


def load_imagereward(
    sd: Mapping[str, Tensor], vision_heads: int = 16, text_heads: int = 12
) -> ImageRewardModel:
    """An ImageRewardModel holding ImageReward weights; strict both ways (see `assemble`)."""
    mapped, _ = imagereward_to_hf(sd)
    vision, text = imagereward_configs(sd, vision_heads, text_heads)
    w = [sd[f"mlp.layers.{i}.weight"] for i in (0, 2, 4, 6, 7)]
    dims = (w[0].shape[1], *(x.shape[0] for x in w))
    return assemble(lambda: ImageRewardModel(vision, text, dims), mapped)


@dataclass(frozen=True)
class ResizeCenterCrop:
    """torchvision Resize(size, BICUBIC) + CenterCrop(size) + Normalize on (B, 3, H, W) in [0, 1].
    The resize is ClipPreprocess's (Pillow within one grey level); CenterCrop rounds its offsets
    (int(round((h - size) / 2))) where transformers floors them."""

    size: int = 224
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD

    def __call__(self, x: Tensor) -> Tensor:
        x = ClipPreprocess(self.size, None, self.mean, self.std, "bicubic")(x)  # (B, 3, h, w)
        h, w = x.shape[-2:]
        top, left = int(round((h - self.size) / 2.0)), int(round((w - self.size) / 2.0))
        return x[..., top : top + self.size, left : left + self.size]


@register_reward("imagereward", defaults={"text": None}, check=check_text)
class ImageRewardScore(LearnedImageReward):
    """ImageReward: (MLP(BLIP [CLS] | image) - 0.167) / 1.033, about -2..2. Setup: model (file,
    folder or hub id), tokenizer, vision_heads, text_heads, device, dtype, batch_size,
    norm_mean, norm_std (applied after ImageReward's own standardisation)."""

    name = "imagereward"

    def __init__(
        self, model: str | os.PathLike = "THUDM/ImageReward",
        tokenizer: str | os.PathLike = "bert-base-uncased", vision_heads: int = 16,
        text_heads: int = 12, device: str | None = None, dtype: str | None = None,
        batch_size: int = 16, norm_mean: float = 0.0, norm_std: float = 1.0,
    ) -> None:  # fmt: skip
        setup = ScorerSetup.check(self.name, device, dtype, batch_size, norm_mean, norm_std)
        tok_src = check_source(self.name, "tokenizer", tokenizer, TOK_WHAT)
        path = resolve_file(self.name, "model", model, "ImageReward.pt", MODEL_WHAT)
        super().__init__(setup)
        from transformers import AutoTokenizer

        self.tokenizer = from_pretrained(
            self.name, "tokenizer", tok_src, TOK_WHAT, AutoTokenizer.from_pretrained
        )
        sd = load_state_dict(self.name, "model", path, MODEL_WHAT)
        try:
            net = load_imagereward(sd, vision_heads, text_heads)
        except (KeyError, ValueError, RuntimeError) as e:
            raise setup_error(
                self.name, "model", path, f"is not an ImageReward state dict: {e}", MODEL_WHAT
            ) from None
        self.model = frozen(net, setup)
        self.model.mlp.float()
        side = net.vision_model.config.image_size  # an int: imagereward_configs sets it
        self.preprocess = ResizeCenterCrop(side)  # type: ignore[arg-type]
        self.max_length = min(MAX_TOKENS, net.text_encoder.config.max_position_embeddings)

    @torch.no_grad()
    def score_images(self, x: Tensor, texts: list[str]) -> Tensor:
        px = self.preprocess(x.to(self.device)).to(self.dtype)
        enc = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        raw = self.model(px, enc["input_ids"], enc["attention_mask"])
        return (raw - IR_MEAN) / IR_STD
