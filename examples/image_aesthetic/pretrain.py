"""Pre-training of the example's tiny models, cached under one folder (default runs/image_aesthetic_base):

    vq/          diffusers VQModel, 16×16 RGB -> 8×8 codes (factor 2), trained on the shapes
    prior/       LlamaForCausalLM over [BOS, colour, shape, 64 codes] + its word-level tokenizer
    classifier.safetensors   tiny CNN (colour head, shape head) on VQ reconstructions: the
                 "still looks like its prompt" check
    meta.json    the settings of every stage (the cache key) and their measurements

Each stage is reused when meta.json holds the same settings for it and everything before it.

    python examples/image_aesthetic/pretrain.py --out runs/image_aesthetic_base
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ (see run.py)
from image_aesthetic.shapes import COLOURS, SHAPES, make_images  # noqa: E402

VQ = {"steps": 800, "batch_size": 32, "lr": 2e-3, "codebook": 256, "channels": [16, 32]}
PRIOR = {"steps": 1200, "batch_size": 32, "lr": 3e-3, "hidden": 96, "layers": 3, "p_uncond": 0.1}
CLS = {"steps": 500, "batch_size": 128, "lr": 3e-3, "n_test": 2000}
DATA = {"n_train": 12000, "size": 16, "seed": 0}
WORDS = ("<pad>", "<bos>", "<eos>", *COLOURS, *SHAPES)
CODE_OFFSET = 16  # LM id of code 0: the word vocabulary (14 ids) rounded up


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, flush=True)


def _lr(step: int, steps: int, warmup: int = 20, final: float = 0.1) -> float:
    """Linear warm-up, then cosine to `final` of the peak."""
    cos = final + (1 - final) / 2 * (1 + math.cos(math.pi * min(step, steps) / steps))
    return min(1.0, (step + 1) / warmup) * cos


# ------------------------------------------------------------------------------------------ VQ
def build_vq(codebook: int, channels: list[int], size: int) -> Any:
    from diffusers import VQModel

    return VQModel(
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=tuple(channels),
        layers_per_block=1,
        latent_channels=4,
        num_vq_embeddings=codebook,
        vq_embed_dim=4,
        norm_num_groups=8,
        sample_size=size,
        mid_block_add_attention=False,
    )


def train_vq(images: Tensor, steps: int, batch_size: int, lr: float, codebook: int,
             channels: list[int], seed: int, verbose: bool = True) -> tuple[Any, dict]:  # fmt: skip
    """MSE + commitment loss on pixels in [-1, 1]; the codebook starts from encoder latents and
    codes unused for 100 steps are re-seeded from the current batch (no dead codes)."""
    torch.manual_seed(seed)
    vq = build_vq(codebook, channels, images.shape[-1]).train()
    x_all = images * 2 - 1
    emb = vq.quantize.embedding.weight
    with torch.no_grad():
        lat = vq.encode(x_all[:512]).latents.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
        emb.copy_(lat[torch.randperm(len(lat))[:codebook]])
    opt = torch.optim.Adam(vq.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, steps))
    used = torch.zeros(codebook, dtype=torch.bool)
    t0 = time.perf_counter()
    for step in range(steps):
        x = x_all[torch.randint(0, len(x_all), (batch_size,))]
        lat = vq.encode(x).latents
        z_q, commit, (_, _, idx) = vq.quantize(lat)
        rec = vq.decoder(vq.post_quant_conv(z_q), None)
        loss = F.mse_loss(rec, x) + commit.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        used[idx.flatten()] = True
        if step % 100 == 99 and step < steps - 100:
            dead = (~used).nonzero().flatten()
            if len(dead):
                with torch.no_grad():
                    pool = lat.detach().permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
                    emb[dead] = pool[torch.randint(0, len(pool), (len(dead),))]
            used.zero_()
        if step % 100 == 0 or step == steps - 1:
            _log(
                verbose,
                f"vq    step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - t0:5.1f}s",
            )
    vq.eval()
    return vq, {"seconds": round(time.perf_counter() - t0, 1)}


@torch.no_grad()
def vq_codes(vq: Any, images: Tensor, batch: int = 512) -> Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, h, w) long codes."""
    out = []
    for i in range(0, len(images), batch):
        lat = vq.encode(images[i : i + batch] * 2 - 1).latents
        _, _, (_, _, idx) = vq.quantize(lat)
        out.append(idx.reshape(lat.shape[0], *lat.shape[2:]))
    return torch.cat(out)


@torch.no_grad()
def vq_decode(vq: Any, codes: Tensor, batch: int = 512) -> Tensor:
    """(N, h, w) codes -> (N, 3, H, W) in [0, 1] (the same path as the adapter's DiffusersVQ)."""
    from grpo_ar.adapters.vq import DiffusersVQ, to_unit

    dec = DiffusersVQ(vq)
    return torch.cat(
        [to_unit(dec.decode(codes[i : i + batch])) for i in range(0, len(codes), batch)]
    )


# ---------------------------------------------------------------------------------- classifier
class ShapeClassifier(nn.Module):
    """16×16 RGB -> (colour logits (6), shape logits (5)); trained on VQ reconstructions."""

    def __init__(self) -> None:
        super().__init__()
        # flattened, not pooled: where the corners are is what tells the shapes apart
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
        )  # fmt: skip
        self.colour, self.shape = nn.Linear(128, len(COLOURS)), nn.Linear(128, len(SHAPES))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # each image standardised (one mean and std over its pixels and channels): dark, washed
        # and vivid versions of a shape look alike to the network, hue relations are kept
        f = x.flatten(1)
        x = (x - f.mean(1).view(-1, 1, 1, 1)) / (f.std(1).view(-1, 1, 1, 1) + 0.02)
        h = self.body(x)
        return self.colour(h), self.shape(h)

    @torch.no_grad()
    def accuracy(self, x: Tensor, colour: Tensor, shape: Tensor) -> dict[str, float]:
        """Fractions of images whose colour / shape / both are recognised."""
        c, s = self.eval()(x)
        ok_c, ok_s = c.argmax(-1) == colour, s.argmax(-1) == shape
        return {
            "colour": ok_c.float().mean().item(),
            "shape": ok_s.float().mean().item(),
            "both": (ok_c & ok_s).float().mean().item(),
        }


def train_classifier(data: dict[str, Tensor], steps: int, batch_size: int, lr: float, seed: int,
                     verbose: bool = True) -> ShapeClassifier:  # fmt: skip
    torch.manual_seed(seed)
    net = ShapeClassifier().train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, steps))
    x_all, c_all, s_all = data["images"], data["colour"], data["shape"]
    for step in range(steps):
        i = torch.randint(0, len(x_all), (batch_size,))
        c, s = net(x_all[i])
        loss = F.cross_entropy(c, c_all[i]) + F.cross_entropy(s, s_all[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            _log(verbose, f"cls   step {step:4d}  loss {loss.item():.4f}")
    return net.eval()


# --------------------------------------------------------------------------------------- prior
def build_tokenizer() -> Any:
    """Word-level tokenizer over WORDS: "<bos> colour shape" (pad 0, bos 1, eos 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        padding_side="left",
    )  # fmt: skip


def build_prior(codebook: int, hidden: int, layers: int, n_tokens: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=CODE_OFFSET + codebook, hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=n_tokens + 8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def train_prior(tokenizer: Any, data: dict[str, Tensor], codes: Tensor, steps: int,
                batch_size: int, lr: float, hidden: int, layers: int, p_uncond: float,
                codebook: int, seed: int, verbose: bool = True) -> tuple[Any, dict]:  # fmt: skip
    """Next-code prediction after [BOS, colour, shape]; with probability p_uncond the two words
    become <pad> (still attended): the CFG-unconditional prompt of TextCondition(uncond="masked")."""
    torch.manual_seed(seed)
    flat = codes.reshape(len(codes), -1) + CODE_OFFSET  # (N, 64)
    words = torch.tensor([tokenizer.convert_tokens_to_ids([COLOURS[c], SHAPES[s]])
                          for c, s in zip(data["colour"].tolist(), data["shape"].tolist())])  # fmt: skip
    model = build_prior(codebook, hidden, layers, flat.shape[1] + 3).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest,
                             "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, steps))
    t0 = time.perf_counter()
    for step in range(steps):
        i = torch.randint(0, len(flat), (batch_size,))
        w = words[i].clone()
        w[torch.rand(batch_size) < p_uncond] = tokenizer.pad_token_id
        ids = torch.cat([torch.full((batch_size, 1), tokenizer.bos_token_id), w, flat[i]], 1)
        logits = model(input_ids=ids).logits[:, 2:-1]  # predicts the codes
        loss = F.cross_entropy(logits.flatten(0, 1), flat[i].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            _log(
                verbose,
                f"prior step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - t0:5.1f}s",
            )
    return model.eval(), {"seconds": round(time.perf_counter() - t0, 1), "loss": loss.item()}


# ------------------------------------------------------------------------------------ pipeline
def settings(**overrides: Any) -> dict[str, dict[str, Any]]:
    """Stage settings (the cache key): {"data", "vq", "cls", "prior"}, each updated by overrides."""
    base = {"data": DATA, "vq": VQ, "cls": CLS, "prior": PRIOR}
    return {k: {**v, **overrides.get(k, {})} for k, v in base.items()}


def pretrain(out_dir: str | Path, threads: int = 1, verbose: bool = True,
             **overrides: Any) -> dict[str, Any]:  # fmt: skip
    """Train (or reuse) VQ, classifier and prior; returns paths, meta and the loaded models."""
    from diffusers import VQModel
    from safetensors.torch import load_file, save_file
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    st = settings(**overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    done = meta.setdefault("settings", {})  # settings of the stages saved so far
    same = lambda *ks: all(done.get(k) == st[k] for k in ks)  # noqa: E731

    def saved(stage: str, fresh: bool) -> None:
        if fresh:  # a retrained VQ makes the classifier and the prior stale
            if stage == "vq":
                done.clear()
            done.update({"data": st["data"], stage: st[stage]})
            meta_path.write_text(json.dumps(meta, indent=2))
        else:
            _log(verbose, f"pretrain: reusing {stage} from {out} (same settings)")

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    d = st["data"]
    data: dict[str, Tensor] = {}

    def get_data() -> dict[str, Tensor]:
        if not data:
            data.update(make_images(d["n_train"], d["seed"], d["size"]))
        return data

    fresh = not (same("data", "vq") and (out / "vq" / "config.json").exists())
    if fresh:
        vq, meta["vq"] = train_vq(get_data()["images"], seed=d["seed"], verbose=verbose, **st["vq"])
        vq.save_pretrained(out / "vq")
    else:
        vq = VQModel.from_pretrained(out / "vq").eval()
    saved("vq", fresh)
    fresh = not (same("data", "vq", "cls") and (out / "classifier.safetensors").exists())
    if fresh:
        rec = {**get_data(), "images": vq_decode(vq, vq_codes(vq, get_data()["images"]))}
        kw = {k: v for k, v in st["cls"].items() if k != "n_test"}
        cls = train_classifier(rec, seed=d["seed"], verbose=verbose, **kw)
        save_file(cls.state_dict(), out / "classifier.safetensors")
        test = make_images(st["cls"]["n_test"], d["seed"] + 1, d["size"])
        rec_test = vq_decode(vq, vq_codes(vq, test["images"]))
        meta["cls"] = {
            "acc_pixels": cls.accuracy(test["images"], test["colour"], test["shape"]),
            "acc_vq": cls.accuracy(rec_test, test["colour"], test["shape"]),
        }
        _log(verbose, f"classifier accuracy on fresh images (pixels / VQ): {meta['cls']}")
    else:
        cls = ShapeClassifier()
        cls.load_state_dict(load_file(out / "classifier.safetensors"))
        cls.eval()
    saved("cls", fresh)
    fresh = not (same("data", "vq", "prior") and (out / "prior" / "config.json").exists())
    if fresh:
        tok = build_tokenizer()
        codes = vq_codes(vq, get_data()["images"])
        prior, meta["prior"] = train_prior(
            tok, get_data(), codes, seed=d["seed"], verbose=verbose,
            codebook=st["vq"]["codebook"], **st["prior"],
        )  # fmt: skip
        prior.save_pretrained(out / "prior")
        tok.save_pretrained(out / "prior")
    else:
        prior = LlamaForCausalLM.from_pretrained(out / "prior").eval()
        tok = PreTrainedTokenizerFast.from_pretrained(out / "prior")
    saved("prior", fresh)
    _log(verbose, f"pretrain: ready in {time.perf_counter() - t0:.1f}s -> {out}")
    return {"dir": out, "meta": meta, "vq": vq, "classifier": cls, "prior": prior, "tokenizer": tok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/image_aesthetic_base")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    res = pretrain(args.out, threads=args.threads)
    print(json.dumps({k: v for k, v in res["meta"].items() if k != "settings"}, indent=2))


if __name__ == "__main__":
    main()
