"""Regenerate hps_open_clip_tiny.safetensors and hps_vit_h14_keys.json from hpsv2's own code.

    pip download hpsv2==1.2.0 --no-deps -d /tmp/dl && unzip -q /tmp/dl/hpsv2-*.whl -d /tmp/hps
    python tests/data/make_hps_fixture.py /tmp/hps/hpsv2/src

hpsv2's open_clip imports torchvision only for FrozenBatchNorm2d (ResNet towers, unused by a
ViT), so a stub module stands in and torchvision is never installed. The fixture holds a tiny
random-init open_clip CLIP state dict in the original naming, fixed inputs, and the original
code's normalised image/text features; the JSON lists every key and shape of the real ViT-H-14
(model_configs/ViT-H-14.json, built on the meta device).
"""

import json
import sys
import types
from pathlib import Path

import torch
import transformers  # noqa: F401  # imported before the stub: it probes for torchvision
from safetensors.torch import save_file

HERE = Path(__file__).parent


def import_open_clip(src: Path):
    tv, ops, misc = (
        types.ModuleType(n) for n in ("torchvision", "torchvision.ops", "torchvision.ops.misc")
    )
    misc.FrozenBatchNorm2d = object
    sys.modules.update({"torchvision": tv, "torchvision.ops": ops, "torchvision.ops.misc": misc})
    pkg = types.ModuleType("open_clip")  # skip open_clip/__init__: it imports the transforms
    pkg.__path__ = [str(src / "open_clip")]
    sys.modules["open_clip"] = pkg
    sys.path.insert(0, str(src))
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    return CLIP, CLIPTextCfg, CLIPVisionCfg


def main(src: Path) -> None:
    CLIP, TextCfg, VisionCfg = import_open_clip(src)
    cfg = json.loads((src / "open_clip/model_configs/ViT-H-14.json").read_text())
    with torch.device("meta"):
        big = CLIP(cfg["embed_dim"], VisionCfg(**cfg["vision_cfg"]), TextCfg(**cfg["text_cfg"]))
    lines = ",\n".join(f"{json.dumps(k)}: {list(v.shape)}" for k, v in big.state_dict().items())
    (HERE / "hps_vit_h14_keys.json").write_text("{\n" + lines + "\n}\n")  # one key per line

    torch.manual_seed(0)
    vision = VisionCfg(image_size=28, layers=2, width=16, head_width=8, patch_size=7)
    text = TextCfg(context_length=12, vocab_size=40, width=16, heads=2, layers=2)
    model = CLIP(8, vision, text).eval()
    with torch.no_grad():  # open_clip inits some tensors to zero/constant; randomise all
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        model.logit_scale.fill_(2.5)
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, 28, 28, generator=gen)
    ids = torch.zeros(3, 12, dtype=torch.long)  # open_clip pads with 0; EOT (39) is the top id
    for i, n in enumerate((5, 9, 12)):
        ids[i, :n] = torch.randint(1, 38, (n,), generator=gen)
        ids[i, 0], ids[i, n - 1] = 38, 39
    with torch.no_grad():
        out = model(pixels, ids)
    tensors = {f"sd.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors |= {"in.pixels": pixels, "in.ids": ids}
    tensors |= {"out.image": out[0].contiguous(), "out.text": out[1].contiguous()}
    save_file(tensors, HERE / "hps_open_clip_tiny.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
