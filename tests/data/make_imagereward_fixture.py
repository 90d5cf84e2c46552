"""Regenerate imagereward_tiny.safetensors and imagereward_keys.json from ImageReward's own code.

    pip download image-reward==1.5 --no-deps -d /tmp/dl
    unzip -q /tmp/dl/image_reward-*.whl -d /tmp/ir
    python tests/data/make_imagereward_fixture.py /tmp/ir

ImageReward's BLIP imports timm (PatchEmbed, init helpers), fairscale (checkpoint_wrapper) and
torchvision (its transform), none installed here: stubs stand in, PatchEmbed copied from timm
0.6.13 (a conv; its only parameters), the rest unused when building and running on CPU without
checkpointing. transformers 5 moved three helpers med.py imports (re-pointed), changed
`init_weights` (BertModel runs its own `_init_weights` instead) and dropped
`invert_attention_mask` / `get_head_mask` (copied from transformers 4). The model code itself (vit.py VisionTransformer, med.py BertModel, ImageReward.MLP/ImageReward) is
ImageReward's. The JSON lists every key and shape of the real ImageReward (ViT-L, BLIP's
med_config with encoder_width 1024), built on CPU (about 2 GB).
"""

import json
import sys
import types
from pathlib import Path

import torch
import transformers
import transformers.modeling_utils as mu
import transformers.pytorch_utils as pu
from safetensors.torch import save_file
from torch import nn

HERE = Path(__file__).parent
MED = dict(  # BLIP configs/med_config.json (ImageReward's med_config.json is this file)
    architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu",
    hidden_dropout_prob=0.1, hidden_size=768, initializer_range=0.02, intermediate_size=3072,
    layer_norm_eps=1e-12, max_position_embeddings=512, model_type="bert", num_attention_heads=12,
    num_hidden_layers=12, pad_token_id=0, type_vocab_size=2, vocab_size=30524, encoder_width=768,
    add_cross_attention=True,
)  # fmt: skip


class PatchEmbed(
    nn.Module
):  # timm 0.6.13 timm/models/layers/patch_embed.py (no norm: BLIP passes none)
    def __init__(
        self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None, flatten=True
    ):
        super().__init__()
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.flatten = flatten
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x):
        x = self.proj(x)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)
        return self.norm(x)


def invert_attention_mask(self, mask):  # transformers 4.x ModuleUtilsMixin, removed in 5
    ext = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
    ext = ext.to(dtype=self.dtype)
    return (1.0 - ext) * torch.finfo(self.dtype).min


def key_shapes(sd) -> str:
    """One `"key": [shape]` per line."""
    return "{\n" + ",\n".join(f"{json.dumps(k)}: {list(v.shape)}" for k, v in sd.items()) + "\n}\n"


def stub(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m


def import_imagereward(root: Path):
    for n in (
        "apply_chunking_to_forward",
        "find_pruneable_heads_and_indices",
        "prune_linear_layer",
    ):
        if not hasattr(mu, n):
            setattr(mu, n, getattr(pu, n, None))  # pruning helpers: never called here
    stub("transformers.file_utils", ModelOutput=transformers.utils.ModelOutput)
    for n in (
        "timm",
        "timm.models",
        "fairscale",
        "fairscale.nn",
        "fairscale.nn.checkpoint",
        "torchvision",
    ):
        stub(n)
    stub("timm.models.vision_transformer", _cfg=lambda **k: k, PatchEmbed=PatchEmbed)
    stub("timm.models.registry", register_model=lambda f: f)
    stub(
        "timm.models.layers", trunc_normal_=nn.init.trunc_normal_, DropPath=lambda p: nn.Identity()
    )
    stub("timm.models.helpers", named_apply=None, adapt_input_conv=None)
    stub("timm.models.hub", download_cached_file=None)
    stub("fairscale.nn.checkpoint.checkpoint_activations", checkpoint_wrapper=lambda m, **k: m)
    t = stub("torchvision.transforms", InterpolationMode=types.SimpleNamespace(BICUBIC=3))
    for n in ("Compose", "Resize", "CenterCrop", "ToTensor", "Normalize"):
        setattr(t, n, lambda *a, **k: None)
    for sub in ("", ".models", ".models.BLIP"):  # skip the package __init__s (clip, pandas, ...)
        m = stub("ImageReward" + sub)
        m.__path__ = [str(root / ("ImageReward" + sub.replace(".", "/")))]
    import ImageReward.models.BLIP.blip_pretrain as bp
    from ImageReward.ImageReward import MLP, ImageReward
    from ImageReward.models.BLIP.med import BertConfig, BertModel
    from ImageReward.models.BLIP.vit import VisionTransformer

    # med.py calls the transformers-4 `init_weights` before `post_init`; v5 needs post_init first
    BertModel.init_weights = lambda self: self.apply(self._init_weights)
    BertModel.invert_attention_mask = invert_attention_mask
    BertModel.get_head_mask = lambda self, mask, n: [None] * n if mask is None else mask
    bp.init_tokenizer = lambda: (
        None
    )  # downloads bert-base-uncased; the scorer's tokenizer is separate
    return ImageReward, MLP, BertConfig, BertModel, VisionTransformer


def main(root: Path) -> None:
    ImageReward, MLP, BertConfig, BertModel, VisionTransformer = import_imagereward(root)
    med = HERE / "_med_config.json"
    med.write_text(json.dumps(MED))
    try:  # on CPU: vit.py calls .item() while building, which meta tensors refuse
        big = ImageReward(med_config=str(med))
    finally:
        med.unlink()
    (HERE / "imagereward_keys.json").write_text(key_shapes(big.state_dict()))

    torch.manual_seed(0)  # ImageReward's composition (blip.*, mlp) with tiny original parts
    tiny = nn.Module()
    tiny.blip = nn.Module()
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=16, depth=2, num_heads=2)
    cfg = BertConfig(**{**MED, "hidden_size": 16, "intermediate_size": 24, "num_attention_heads": 2,
                        "num_hidden_layers": 2, "vocab_size": 50,
                        "max_position_embeddings": 20})  # fmt: skip
    cfg.encoder_width = 16
    tiny.blip.visual_encoder, tiny.blip.text_encoder = vit, BertModel(cfg, add_pooling_layer=False)
    tiny.blip.vision_proj, tiny.blip.text_proj = nn.Linear(16, 4), nn.Linear(16, 4)
    tiny.mlp = MLP(16)
    tiny.eval()
    with torch.no_grad():  # trunc-normal / zero inits leave LayerNorms trivial: randomise all
        for name, p in tiny.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if "mlp" not in name else 1 / p.shape[-1] ** 0.5))
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32, generator=gen)
    ids = torch.zeros(3, 8, dtype=torch.long)  # [CLS]=1 ... [SEP]=2, padded with 0 like max_length
    for i, n in enumerate((4, 6, 8)):
        ids[i, :n] = torch.randint(3, 50, (n,), generator=gen)
        ids[i, 0], ids[i, n - 1] = 1, 2
    mask = (ids != 0).long()
    with torch.no_grad():  # ImageReward.score, batched
        emb = tiny.blip.visual_encoder(pixels)
        atts = torch.ones(emb.shape[:-1], dtype=torch.long)
        out = tiny.blip.text_encoder(ids, attention_mask=mask, encoder_hidden_states=emb,
                                     encoder_attention_mask=atts, return_dict=True)  # fmt: skip
        raw = tiny.mlp(out.last_hidden_state[:, 0, :].float())[:, 0]
    tensors = {f"sd.{k}": v.contiguous() for k, v in tiny.state_dict().items()}
    tensors |= {"in.pixels": pixels, "in.ids": ids, "in.mask": mask, "out.raw": raw}
    tensors |= {"out.image_embeds": emb.contiguous()}
    save_file(tensors, HERE / "imagereward_tiny.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
