"""Pre-training of the AR video example's tiny models, cached under one folder
(default runs/video_motion_base):

    vq/      diffusers VQModel, 16×16 RGB frame -> 4×4 codes (factor 4); clips are coded frame
             by frame (grpo_ar.adapters.vq.PerFrameVQ): 8 frames = 128 codes
    prior/   LlamaForCausalLM over [<bos> colour shape moves direction | 128 codes] + its
             word-level tokenizer, trained on clips whose captions are partly wrong (`mislabel`)
    meta.json  the settings of every stage (the cache key) and their measurements

Each stage is reused when meta.json holds the same settings for it and everything before it.

    python examples/video_motion/pretrain.py --out runs/video_motion_base
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
from einops import rearrange
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as video_motion.*: no clash
# with other examples' modules of the same name (pretrain.py) in one process
from video_motion.clips import COLOURS, DIRECTIONS, SHAPES, make_clips  # noqa: E402

DATA = {"n_train": 4000, "mislabel": 0.6, "seed": 0}
VQ = {"steps": 1200, "batch_size": 64, "lr": 2e-3, "codebook": 128, "channels": [16, 32, 32]}
PRIOR = {"steps": 1500, "batch_size": 32, "lr": 2e-3, "hidden": 96, "layers": 3,
         "p_uncond": 0.1, "input_noise": 0.05}  # fmt: skip
WORDS = ("<pad>", "<bos>", "<eos>", *COLOURS, *SHAPES, "moves", *DIRECTIONS)
CODE_OFFSET = 16  # LM id of code 0: the word vocabulary (14 ids) rounded up
PROMPT_LEN = 5  # <bos> colour shape moves direction


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, flush=True)


def _lr(step: int, steps: int, warmup: int = 20, final: float = 0.1) -> float:
    """Linear warm-up, then cosine to `final` of the peak."""
    cos = final + (1 - final) / 2 * (1 + math.cos(math.pi * min(step, steps) / steps))
    return min(1.0, (step + 1) / warmup) * cos


# ------------------------------------------------------------------------------------------ VQ
def build_vq(codebook: int, channels: list[int], size: int = 16) -> Any:
    """diffusers VQModel, spatial factor 2^(len(channels) - 1)."""
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


def patch_latents(vq: Any, x: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, C, h, w) latents, the encoder run on each f×f patch alone
    (f = the spatial factor): a code then depends on its own patch only. On whole frames the
    encoder's mid block sees all 4×4 codes at once, and empty background patches spread over
    most of the codebook (measured: 105 of 128 codes), which the prior cannot predict."""
    f = 2 ** (len(vq.config.block_out_channels) - 1)
    h, w = x.shape[-2] // f, x.shape[-1] // f
    patches = rearrange(x, "b c (h p) (w q) -> (b h w) c p q", p=f, q=f)
    lat = vq.encode(patches).latents  # (B·h·w, C, 1, 1)
    return rearrange(lat, "(b h w) c 1 1 -> b c h w", h=h, w=w)


def train_vq(frames: Tensor, steps: int, batch_size: int, lr: float, codebook: int,
             channels: list[int], seed: int, verbose: bool = True) -> tuple[Any, dict]:  # fmt: skip
    """MSE + commitment loss on (N, 3, H, W) frames in [0, 1] (the model sees [-1, 1]), codes
    from `patch_latents`; the codebook starts from encoder latents and codes unused for 100
    steps are re-seeded from the current batch (no dead codes)."""
    torch.manual_seed(seed)
    vq = build_vq(codebook, channels, frames.shape[-1]).train()
    x_all = frames * 2 - 1
    emb = vq.quantize.embedding.weight
    with torch.no_grad():
        lat = patch_latents(vq, x_all[:512]).permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
        emb.copy_(lat[torch.randperm(len(lat))[:codebook]])
    opt = torch.optim.Adam(vq.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, steps))
    used = torch.zeros(codebook, dtype=torch.bool)
    t0 = time.perf_counter()
    for step in range(steps):
        x = x_all[torch.randint(0, len(x_all), (batch_size,))]
        lat = patch_latents(vq, x)
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
        if step % 250 == 0 or step == steps - 1:
            _log(
                verbose,
                f"vq    step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - t0:5.1f}s",
            )
    return vq.eval(), {"seconds": round(time.perf_counter() - t0, 1), "loss": loss.item()}


@torch.no_grad()
def clip_codes(vq: Any, clips: Tensor, batch: int = 256) -> Tensor:
    """(N, F, 3, H, W) clips in [0, 1] -> (N, F, h, w) codes, frame by frame, patch by patch
    (`patch_latents`; not `PerFrameVQ.encode`, which runs the encoder on whole frames)."""
    frames = clips.flatten(0, 1) * 2 - 1
    out = []
    for i in range(0, len(frames), batch):
        _, _, (_, _, idx) = vq.quantize(patch_latents(vq, frames[i : i + batch]))
        out.append(idx)
    h = clips.shape[-1] // 2 ** (len(vq.config.block_out_channels) - 1)
    return torch.cat(out).reshape(*clips.shape[:2], h, h)


@torch.no_grad()
def clip_decode(vq: Any, codes: Tensor, batch: int = 256) -> Tensor:
    """(N, F, h, w) codes -> (N, F, 3, H, W) in [0, 1] (the adapter's decoding path)."""
    from grpo_ar.adapters.vq import DiffusersVQ, PerFrameVQ, to_unit

    dec = PerFrameVQ(DiffusersVQ(vq))
    return torch.cat(
        [to_unit(dec.decode(codes[i : i + batch])) for i in range(0, len(codes), batch)]
    )


# --------------------------------------------------------------------------------------- prior
def build_tokenizer() -> Any:
    """Word-level tokenizer over WORDS: "<bos> red ball moves left" (pad 0, bos 1, eos 2)."""
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


def caption_ids(tokenizer: Any, data: dict[str, Tensor]) -> Tensor:
    """(N, 5) prompt ids of the clips' captions ("<bos> colour shape moves <said>")."""
    rows = zip(data["colour"].tolist(), data["shape"].tolist(), data["said"].tolist())
    texts = [f"{COLOURS[c]} {SHAPES[s]} moves {DIRECTIONS[d]}" for c, s, d in rows]
    return torch.tensor(tokenizer(texts)["input_ids"])


def train_prior(tokenizer: Any, prompt_ids: Tensor, codes: Tensor, steps: int, batch_size: int,
                lr: float, hidden: int, layers: int, p_uncond: float, input_noise: float,
                codebook: int, seed: int, verbose: bool = True) -> tuple[Any, dict]:  # fmt: skip
    """Next-code prediction after the caption; with probability p_uncond the caption words
    become <pad> (BOS kept, still attended): the CFG-unconditional prompt of
    TextCondition(uncond="masked"). A fraction `input_noise` of the input codes is replaced by
    random codes (the targets stay clean): the prior learns to continue a clip past a wrong
    code instead of drifting (a second object, a colour change) after one unlikely sample."""
    torch.manual_seed(seed)
    flat = codes.reshape(len(codes), -1) + CODE_OFFSET  # (N, F·h·w)
    n_prompt = prompt_ids.shape[1]
    model = build_prior(codebook, hidden, layers, flat.shape[1] + n_prompt).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest,
                             "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(s, steps))
    t0 = time.perf_counter()
    for step in range(steps):
        i = torch.randint(0, len(flat), (batch_size,))
        p = prompt_ids[i].clone()
        drop = torch.rand(batch_size) < p_uncond
        p[drop, 1:] = tokenizer.pad_token_id
        noisy = flat[i].clone()
        hit = torch.rand(noisy.shape) < input_noise
        noisy[hit] = CODE_OFFSET + torch.randint(0, codebook, (int(hit.sum()),))
        ids = torch.cat([p, noisy], 1)
        logits = model(input_ids=ids).logits[:, n_prompt - 1 : -1]  # predicts the codes
        loss = F.cross_entropy(logits.flatten(0, 1), flat[i].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            _log(
                verbose,
                f"prior step {step:4d}  loss {loss.item():.3f}  {time.perf_counter() - t0:5.1f}s",
            )
    return model.eval(), {"seconds": round(time.perf_counter() - t0, 1), "loss": loss.item()}


# ------------------------------------------------------------------------------------ pipeline
def settings(**overrides: Any) -> dict[str, dict[str, Any]]:
    """Stage settings (the cache key): {"data", "vq", "prior"}, each updated by overrides."""
    base = {"data": DATA, "vq": VQ, "prior": PRIOR}
    unknown = set(overrides) - set(base)
    if unknown:
        raise ValueError(f"unknown pre-training stage(s) {sorted(unknown)}: use data, vq, prior")
    return {k: {**v, **overrides.get(k, {})} for k, v in base.items()}


def pretrain(out_dir: str | Path, threads: int = 1, verbose: bool = True,
             **overrides: Any) -> dict[str, Any]:  # fmt: skip
    """Train (or reuse) the VQ tokenizer and the prior; returns the folder, meta and models."""
    from diffusers import VQModel
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    st = settings(**overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    done = meta.setdefault("settings", {})  # settings of the stages saved so far
    same = lambda *ks: all(done.get(k) == st[k] for k in ks)  # noqa: E731
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    data: dict[str, Tensor] = {}

    def get_data() -> dict[str, Tensor]:
        if not data:
            d = st["data"]
            data.update(make_clips(d["n_train"], d["seed"], d["mislabel"]))
        return data

    if same("data", "vq") and (out / "vq" / "config.json").exists():
        _log(verbose, f"pretrain: reusing vq from {out} (same settings)")
        vq = VQModel.from_pretrained(out / "vq").eval()
    else:
        frames = get_data()["clips"].flatten(0, 1)
        vq, meta["vq"] = train_vq(frames, seed=st["data"]["seed"], verbose=verbose, **st["vq"])
        vq.save_pretrained(out / "vq")
        done.clear()  # a new tokenizer makes the prior stale
        done.update({"data": st["data"], "vq": st["vq"]})
        meta_path.write_text(json.dumps(meta, indent=2))
    if same("data", "vq", "prior") and (out / "prior" / "config.json").exists():
        _log(verbose, f"pretrain: reusing prior from {out} (same settings)")
        prior = LlamaForCausalLM.from_pretrained(out / "prior").eval()
        tok = PreTrainedTokenizerFast.from_pretrained(out / "prior")
    else:
        tok = build_tokenizer()
        codes = clip_codes(vq, get_data()["clips"])
        prior, meta["prior"] = train_prior(
            tok, caption_ids(tok, get_data()), codes, seed=st["data"]["seed"], verbose=verbose,
            codebook=st["vq"]["codebook"], **st["prior"],
        )  # fmt: skip
        prior.save_pretrained(out / "prior")
        tok.save_pretrained(out / "prior")
        done["prior"] = st["prior"]
        meta_path.write_text(json.dumps(meta, indent=2))
    _log(verbose, f"pretrain: ready in {time.perf_counter() - t0:.1f}s -> {out}")
    return {"dir": out, "meta": meta, "vq": vq, "prior": prior, "tokenizer": tok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/video_motion_base")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    res = pretrain(args.out, threads=args.threads)
    print(json.dumps({k: v for k, v in res["meta"].items() if k != "settings"}, indent=2))


if __name__ == "__main__":
    main()
