"""Pre-training of the Janus text-to-image example's tiny models, cached under one folder
(default runs/janus_t2i_base), every one a real transformers class:

    janus/       JanusForConditionalGeneration (Llama text model, tiny vision tower, a JanusVQVAE
                 16×16 -> 8×8 codes) + its char-level tokenizer with Janus' chat tokens
    scorer/      CLIPModel + CLIPImageProcessor + word tokenizer: the PickScore-style reward model
    classifier.safetensors   the image example's colour/shape CNN on Janus-VQ reconstructions:
                 the held-out judge of prompt fidelity
    reward_classifier.safetensors   a second such CNN (other images, seed, init; GRPO's
                 training prompts only): what the `prompt_fidelity` reward reads
    meta.json    the settings of every stage (the cache key) and their measurements

    python examples/janus_t2i/pretrain.py --out runs/janus_t2i_base
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ (see run.py)
from ar_common.pretraining import StageCache, log, log_step, main, optimizer_step, scheduled  # noqa: E402
from image_aesthetic.pretrain import ShapeClassifier, reward_classifier, train_classifier  # noqa: E402
from image_aesthetic.shapes import COLOURS, PROMPTS, SHAPES, make_images  # noqa: E402
from janus_t2i.scorer import load_scorer, train_scorer  # noqa: E402

from grpo_ar.adapters.vq import JanusVQ, to_unit  # noqa: E402

VQ = {"steps": 400, "batch_size": 32, "lr": 2e-3, "codebook": 128, "channels": 32, "dim": 8}
JANUS = {"steps": 900, "batch_size": 32, "lr": 3e-3, "hidden": 96, "layers": 3, "p_uncond": 0.1}
CLS = {"steps": 400, "batch_size": 128, "lr": 3e-3}
# the reward classifier: the judge's recipe on other images (data seed 7) of the training prompts
RCLS = {"steps": 400, "batch_size": 128, "lr": 3e-3, "n_train": 6000, "n_test": 1000, "seed": 7}
SCORER = {"steps": 800, "batch_size": 64, "lr": 2e-3, "hidden": 64, "pref_weight": 1.0}
DATA = {"n_train": 8000, "size": 16, "seed": 0}


# ------------------------------------------------------------------------------------------ VQ
def vq_config(codebook: int, channels: int, dim: int, size: int) -> Any:
    """JanusVQVAEConfig: spatial factor 2 (16×16 -> 8×8), `codebook` codes of `dim`."""
    from transformers import JanusVQVAEConfig

    return JanusVQVAEConfig(
        embed_dim=dim, num_embeddings=codebook, latent_channels=channels, base_channels=channels,
        channel_multiplier=[1, 1], num_res_blocks=1, num_patches=size // 2, in_channels=3,
        out_channels=3, projection_dim=dim, image_token_embed_dim=dim,
    )  # fmt: skip


def train_vq(images: Tensor, steps: int, batch_size: int, lr: float, codebook: int,
             channels: int, dim: int, seed: int, verbose: bool = True) -> tuple[Any, dict]:  # fmt: skip
    """A JanusVQVAE on (N, 3, H, W) images in [0, 1]: MSE + commitment. Codebook rows are kept
    L2-normalised and so is the encoder's output: `JanusVQVAE.decode` looks codes up
    normalised, so nearest-code search and decoding then see the same vectors."""
    from transformers import JanusVQVAE

    torch.manual_seed(seed)
    vq = JanusVQVAE(vq_config(codebook, channels, dim, images.shape[-1])).train()
    x_all, emb = images * 2 - 1, vq.quantize.embedding.weight
    latent = lambda x: F.normalize(vq.quant_conv(vq.encoder(x)), dim=1)  # noqa: E731  (B, D, h, w)
    with torch.no_grad():
        z = latent(x_all[:256]).permute(0, 2, 3, 1).reshape(-1, dim)
        emb.copy_(z[torch.randperm(len(z))[:codebook]])
    opt = torch.optim.Adam(vq.parameters(), lr=lr)
    sched, t0 = scheduled(opt, steps), time.perf_counter()
    for step in range(steps):
        x = x_all[torch.randint(0, len(x_all), (batch_size,))]
        z = latent(x)
        zq, commit, _ = vq.quantize(z)  # straight-through
        rec = vq.decoder(vq.post_quant_conv(zq))
        loss = F.mse_loss(rec, x) + commit
        optimizer_step(opt, sched, loss)
        with torch.no_grad():
            emb.copy_(F.normalize(emb, dim=-1))
        log_step(verbose, "vq", step, steps, 100, loss, t0)
    return vq.eval(), {"seconds": round(time.perf_counter() - t0, 1), "loss": loss.item()}


@torch.no_grad()
def vq_codes(vq: Any, images: Tensor, batch: int = 512) -> Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, h, w) codes (the adapter's JanusVQ encode)."""
    dec = JanusVQ(vq)
    return torch.cat(
        [dec.encode(images[i : i + batch] * 2 - 1) for i in range(0, len(images), batch)]
    )


@torch.no_grad()
def vq_decode(vq: Any, codes: Tensor, batch: int = 512) -> Tensor:
    """(N, h, w) codes -> (N, 3, H, W) in [0, 1], the adapter's decoding path."""
    dec = JanusVQ(vq)
    return torch.cat(
        [to_unit(dec.decode(codes[i : i + batch])) for i in range(0, len(codes), batch)]
    )


# --------------------------------------------------------------------------------------- Janus
def janus_tokenizer() -> Any:
    """Char-level tokenizer (pad 0, bos 1) with Janus' chat and image-start tokens."""
    from grpo_ar.testing import CHARS, word_level_tokenizer

    tok = word_level_tokenizer([*CHARS, "\n"], chars=True)
    tok.add_special_tokens(
        {"additional_special_tokens": ["<|User|>", "<|Assistant|>", "<begin_of_image>"]}
    )
    return tok


def build_janus(vq: Any, tok: Any, hidden: int, layers: int, seed: int) -> Any:
    """JanusForConditionalGeneration around the trained VQ (its weights copied in)."""
    from transformers import (
        JanusConfig,
        JanusForConditionalGeneration,
        JanusVisionConfig,
        JanusVQVAEConfig,
        LlamaConfig,
    )

    torch.manual_seed(seed)
    vocab = len(tok) + 1  # + the understanding path's image placeholder id
    text = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    side = int(vq.config.num_patches)  # JanusConfig sets the VQ's grid from the vision tower's
    vision = JanusVisionConfig(  # unused by generation otherwise; as small as the class allows
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=2 * side,
        patch_size=2, projection_dim=hidden, num_image_tokens=side * side, depth=1, mlp_ratio=2.0,
    )  # fmt: skip
    vq_cfg = JanusVQVAEConfig(
        **{**vq.config.to_dict(), "projection_dim": hidden, "image_token_embed_dim": hidden}
    )
    cfg = JanusConfig(text_config=text, vision_config=vision, vq_config=vq_cfg,
                      image_token_id=vocab - 1)  # fmt: skip
    model = JanusForConditionalGeneration(cfg)
    model.model.vqmodel.load_state_dict(vq.state_dict())
    return model


def train_janus(vq: Any, codes: Tensor, prompt_index: Tensor, steps: int, batch_size: int,
                lr: float, hidden: int, layers: int, p_uncond: float, seed: int,
                verbose: bool = True) -> tuple[Any, Any, dict]:  # fmt: skip
    """Teacher-forced next-code prediction through the `janus_image` model call on
    [Janus T2I prompt of the caption, 64 codes]; with probability p_uncond the prompt is the
    adapter's own CFG-unconditional one (pad but BOS and <begin_of_image>, attended)."""
    from grpo_ar.adapters.janus import JanusImageCall, JanusT2IAdapter, janus_trainable
    from grpo_ar.generation.params import SamplingParams
    from grpo_ar.types import Entry

    tok = janus_tokenizer()
    model = build_janus(vq, tok, hidden, layers, seed)
    janus_trainable(model)
    ad = JanusT2IAdapter(model, tok, SamplingParams(cfg_scale=2.0))
    batch = ad.encode([Entry(p, ()) for p in PROMPTS])  # the 30 prompts, left-padded alike
    cond, uncond, mask = batch.input_ids, batch.uncond_input_ids, batch.attention_mask
    call, flat = JanusImageCall(model), codes.flatten(1)  # (N, T)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched, t0, n_prompt = scheduled(opt, steps), time.perf_counter(), cond.shape[1]
    model.train()
    for step in range(steps):
        i = torch.randint(0, len(flat), (batch_size,))
        pi = prompt_index[i]
        drop = (torch.rand(batch_size) < p_uncond)[:, None]
        ids = torch.where(drop, uncond[pi], cond[pi])  # (B, P)
        m = torch.cat([mask[pi], torch.ones_like(flat[i])], 1)  # (B, P + T)
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        emb = torch.cat([call.embed(ids, False), call.embed(flat[i], True)], 1)
        h = call.run(emb, m, pos, None)[:, n_prompt - 1 : -1]  # (B, T, D)
        loss = F.cross_entropy(call.logits(h).flatten(0, 1), flat[i].flatten())
        optimizer_step(opt, sched, loss, clip=params)
        log_step(verbose, "janus", step, steps, 100, loss, t0, digits=3)
    measured = {"seconds": round(time.perf_counter() - t0, 1), "loss": loss.item()}
    return model.eval(), tok, measured


# ------------------------------------------------------------------------------------ pipeline
def settings(**overrides: Any) -> dict[str, dict[str, Any]]:
    from ar_common.pretraining import settings as stage_settings

    base = {"data": DATA, "vq": VQ, "cls": CLS, "scorer": SCORER, "janus": JANUS, "rcls": RCLS}
    return stage_settings(base, **overrides)


def pretrain(out_dir: str | Path, threads: int = 1, verbose: bool = True,
             **overrides: Any) -> dict[str, Any]:  # fmt: skip
    """Train (or reuse) VQ, judge classifier, scorer, Janus and reward classifier; returns paths,
    meta and the models."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, JanusForConditionalGeneration, JanusVQVAE

    cache = StageCache(out_dir, settings(**overrides), verbose, threads)
    st, d, out = cache.st, cache.st["data"], cache.out
    data = functools.cache(lambda: make_images(d["n_train"], d["seed"], d["size"]))
    if cache.reusable("vq", "vq/config.json"):
        vq = JanusVQVAE.from_pretrained(out / "vq").eval()
    else:
        vq, measured = train_vq(data()["images"], seed=d["seed"], verbose=verbose, **st["vq"])
        vq.save_pretrained(out / "vq")
        cache.record("vq", measured, first=True)
    codes = functools.cache(lambda: vq_codes(vq, data()["images"]))
    recon = functools.cache(lambda: {**data(), "images": vq_decode(vq, codes())})
    if cache.reusable("cls", "classifier.safetensors", after=("vq",)):
        cls = ShapeClassifier()
        cls.load_state_dict(load_file(out / "classifier.safetensors"))
    else:
        cls = train_classifier(recon(), seed=d["seed"], verbose=verbose, **st["cls"])
        test = make_images(1000, d["seed"] + 1, d["size"])
        rec = vq_decode(vq, vq_codes(vq, test["images"]))
        acc = cls.accuracy(rec, test["colour"], test["shape"])
        log(verbose, f"classifier on VQ reconstructions of fresh images: {acc}")
        save_file(cls.state_dict(), out / "classifier.safetensors")
        cache.record("cls", {"acc_vq": acc})
    if not cache.reusable("scorer", "scorer/config.json", after=("vq",)):
        measured = train_scorer(recon(), out / "scorer", seed=d["seed"], verbose=verbose,
                                **st["scorer"])  # fmt: skip
        cache.record("scorer", measured)
    if cache.reusable("janus", "janus/config.json", after=("vq",)):
        janus = JanusForConditionalGeneration.from_pretrained(out / "janus").eval()
        tok = AutoTokenizer.from_pretrained(out / "janus")
    else:
        prompt_index = data()["colour"] * len(SHAPES) + data()["shape"]  # index into PROMPTS
        janus, tok, measured = train_janus(vq, codes(), prompt_index, seed=d["seed"],
                                           verbose=verbose, **st["janus"])  # fmt: skip
        janus.save_pretrained(out / "janus")
        tok.save_pretrained(out / "janus")
        cache.record("janus", measured)
    if cache.reusable("rcls", "reward_classifier.safetensors", after=("vq",)):
        rcls = ShapeClassifier()
        rcls.load_state_dict(load_file(out / "reward_classifier.safetensors"))
    else:
        rcls, measured = reward_classifier(vq, st, verbose, vq_codes, vq_decode,
                                           "Janus-VQ reconstructions")  # fmt: skip
        save_file(rcls.state_dict(), out / "reward_classifier.safetensors")
        cache.record("rcls", measured)
    assert len(PROMPTS) == len(COLOURS) * len(SHAPES)
    return cache.ready(vq=vq, classifier=cls.eval(), janus=janus, tokenizer=tok,
                       scorer=load_scorer(out / "scorer"), reward_classifier=rcls.eval())  # fmt: skip


if __name__ == "__main__":
    main(pretrain, __doc__, "runs/janus_t2i_base")
