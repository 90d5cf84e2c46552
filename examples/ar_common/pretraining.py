"""Pre-training shared by the AR image and video examples: a diffusers VQModel tokenizer
(MSE + commitment, dead codes re-seeded), a Llama prior over its codes after a word-level text
prompt (CFG-unconditional rows with the words masked), and a cache of the stages in one folder,
keyed by their settings in meta.json."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from grpo_ar.testing import causal_lm, lm_config, vq_model

CODE_OFFSET = 16  # LM id of code 0: the examples' word vocabularies (≤ 16 ids) rounded up


def log(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, flush=True)


def lr_factor(step: int, steps: int, warmup: int = 20, final: float = 0.1) -> float:
    """Linear warm-up, then cosine to `final` of the peak."""
    cos = final + (1 - final) / 2 * (1 + math.cos(math.pi * min(step, steps) / steps))
    return min(1.0, (step + 1) / warmup) * cos


def scheduled(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`opt`'s learning rate times `lr_factor` of the step."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps))


def optimizer_step(opt: torch.optim.Optimizer, sched: Any, loss: Tensor,
                   clip: Any = None) -> None:  # fmt: skip
    """One update; `clip`: parameters whose gradient norm is clipped to 1 first."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()
    sched.step()


def log_step(verbose: bool, stage: str, step: int, steps: int, every: int, loss: Tensor,
             t0: float | None = None, digits: int = 4) -> None:  # fmt: skip
    """Progress of a training loop, every `every` steps and at the last one."""
    if step % every == 0 or step == steps - 1:
        took = "" if t0 is None else f"  {time.perf_counter() - t0:5.1f}s"
        log(verbose, f"{stage:<5} step {step:4d}  loss {loss.item():.{digits}f}{took}")


def encoder_latents(vq: Any, x: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, C, h, w): the VQModel's encoder on whole images."""
    return vq.encode(x).latents


def train_vq(images: Tensor, steps: int, batch_size: int, lr: float, codebook: int,
             channels: list[int], seed: int, verbose: bool = True, log_every: int = 100,
             encode: Callable[[Any, Tensor], Tensor] = encoder_latents) -> tuple[Any, dict]:  # fmt: skip
    """MSE + commitment loss on (N, 3, H, W) images in [0, 1] (the model sees [-1, 1]), codes
    from `encode(vq, x)`; the codebook starts from encoder latents and codes unused for 100
    steps are re-seeded from the current batch (no dead codes). -> (vq in eval mode, meta)."""
    torch.manual_seed(seed)
    vq = vq_model(codebook, channels, images.shape[-1]).train()
    x_all = images * 2 - 1
    emb = vq.quantize.embedding.weight
    with torch.no_grad():
        lat = encode(vq, x_all[:512]).permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
        emb.copy_(lat[torch.randperm(len(lat))[:codebook]])
    opt = torch.optim.Adam(vq.parameters(), lr=lr)
    sched = scheduled(opt, steps)
    used = torch.zeros(codebook, dtype=torch.bool)
    t0 = time.perf_counter()
    for step in range(steps):
        x = x_all[torch.randint(0, len(x_all), (batch_size,))]
        lat = encode(vq, x)
        z_q, commit, (_, _, idx) = vq.quantize(lat)
        rec = vq.decoder(vq.post_quant_conv(z_q), None)
        loss = F.mse_loss(rec, x) + commit.mean()
        optimizer_step(opt, sched, loss)
        used[idx.flatten()] = True
        if step % 100 == 99 and step < steps - 100:
            dead = (~used).nonzero().flatten()
            if len(dead):
                with torch.no_grad():
                    pool = lat.detach().permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
                    emb[dead] = pool[torch.randint(0, len(pool), (len(dead),))]
            used.zero_()
        log_step(verbose, "vq", step, steps, log_every, loss, t0)
    return vq.eval(), {"seconds": round(time.perf_counter() - t0, 1), "loss": loss.item()}


@torch.no_grad()
def decode_codes(decoder: Any, codes: Tensor, batch: int) -> Tensor:
    """Codes -> pixels in [0, 1] through an adapter decoder (grpo_ar.adapters.vq), in batches."""
    from grpo_ar.adapters.vq import to_unit

    return torch.cat(
        [to_unit(decoder.decode(codes[i : i + batch])) for i in range(0, len(codes), batch)]
    )


def build_prior(codebook: int, hidden: int, layers: int, n_tokens: int) -> Any:
    """LlamaForCausalLM over CODE_OFFSET word ids + `codebook` codes, `n_tokens` per row."""
    cfg = lm_config(CODE_OFFSET + codebook, hidden, layers, kv_heads=4, mlp=4 * hidden,
                    max_positions=n_tokens + 8, tie_word_embeddings=False)  # fmt: skip
    return causal_lm(cfg)


def train_prior(tokenizer: Any, prompt_ids: Tensor, codes: Tensor, steps: int, batch_size: int,
                lr: float, hidden: int, layers: int, p_uncond: float, codebook: int, seed: int,
                input_noise: float = 0.0, verbose: bool = True,
                log_every: int = 100) -> tuple[Any, dict]:  # fmt: skip
    """Next-code prediction after the (N, P) prompt ids ("<bos> words"); with probability
    p_uncond the words become <pad> (BOS kept, still attended): the CFG-unconditional prompt of
    TextCondition(uncond="masked"). A fraction `input_noise` of the input codes is replaced by
    random codes (the targets stay clean): the prior learns to continue past a wrong code
    instead of drifting after one unlikely sample."""
    torch.manual_seed(seed)
    flat = codes.reshape(len(codes), -1) + CODE_OFFSET  # (N, T) code ids
    n_prompt = prompt_ids.shape[1]
    model = build_prior(codebook, hidden, layers, flat.shape[1] + n_prompt).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest,
                             "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))  # fmt: skip
    sched = scheduled(opt, steps)
    t0 = time.perf_counter()
    for step in range(steps):
        i = torch.randint(0, len(flat), (batch_size,))
        p = prompt_ids[i].clone()  # (B, P)
        p[torch.rand(batch_size) < p_uncond, 1:] = tokenizer.pad_token_id
        noisy = flat[i].clone()  # (B, T)
        if input_noise:  # no draw without noise: the image example's stream stays as it was
            hit = torch.rand(noisy.shape) < input_noise
            noisy[hit] = CODE_OFFSET + torch.randint(0, codebook, (int(hit.sum()),))
        logits = model(input_ids=torch.cat([p, noisy], 1)).logits[:, n_prompt - 1 : -1]
        loss = F.cross_entropy(logits.flatten(0, 1), flat[i].flatten())
        optimizer_step(opt, sched, loss, clip=model.parameters())
        log_step(verbose, "prior", step, steps, log_every, loss, t0, digits=3)
    return model.eval(), {"seconds": round(time.perf_counter() - t0, 1), "loss": loss.item()}


def settings(base: dict[str, dict[str, Any]], **overrides: Any) -> dict[str, dict[str, Any]]:
    """Stage settings (the cache key): each stage of `base` updated by `overrides[stage]`."""
    unknown = set(overrides) - set(base)
    if unknown:
        raise ValueError(f"unknown pre-training stage(s) {sorted(unknown)}: use {', '.join(base)}")
    return {k: {**v, **overrides.get(k, {})} for k, v in base.items()}


def main(pretrain: Callable[..., dict[str, Any]], doc: str, out: str) -> None:
    """An example's `pretrain.py` command line: --out, --threads; prints the measurements."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", default=out)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    res = pretrain(args.out, threads=args.threads)
    print(json.dumps({k: v for k, v in res["meta"].items() if k != "settings"}, indent=2))


class StageCache:
    """Pre-training stages saved in one folder; meta.json holds the settings each was trained
    with ("settings") and what it measured (one key per stage). A stage is reused while its
    settings, the data's and those of the stages it depends on are unchanged."""

    def __init__(self, out_dir: str | Path, st: dict[str, dict[str, Any]], verbose: bool = True,
                 threads: int = 0) -> None:  # fmt: skip
        self.out, self.st, self.verbose = Path(out_dir), st, verbose
        self.out.mkdir(parents=True, exist_ok=True)
        self.meta_path = self.out / "meta.json"
        self.meta = json.loads(self.meta_path.read_text()) if self.meta_path.exists() else {}
        self.done = self.meta.setdefault("settings", {})  # settings of the stages saved so far
        if threads:
            torch.set_num_threads(threads)
        self.t0 = time.perf_counter()

    def reusable(self, stage: str, saved: str, after: tuple[str, ...] = ()) -> bool:
        """Whether `stage` (file `saved` in the folder) was saved with the current settings of
        the data, the stages `after` and its own; says so when it is reused."""
        keys = ("data", *after, stage)
        ok = all(self.done.get(k) == self.st[k] for k in keys) and (self.out / saved).exists()
        if ok:
            log(self.verbose, f"pretrain: reusing {stage} from {self.out} (same settings)")
        return ok

    def record(self, stage: str, measured: dict[str, Any], first: bool = False) -> None:
        """`stage` was trained and saved: its settings and measurements go to meta.json. A
        retrained `first` stage makes every later one stale."""
        if first:
            self.done.clear()
        self.meta[stage] = measured
        self.done.update({"data": self.st["data"], stage: self.st[stage]})
        self.meta_path.write_text(json.dumps(self.meta, indent=2))

    def ready(self, **models: Any) -> dict[str, Any]:
        """-> {"dir", "meta", **models}: what an example's `pretrain` returns."""
        log(self.verbose, f"pretrain: ready in {time.perf_counter() - self.t0:.1f}s -> {self.out}")
        return {"dir": self.out, "meta": self.meta, **models}


def vq_stage(cache: StageCache, train: Callable[[], tuple[Any, dict]]) -> Any:
    """The VQModel saved in the cache (vq/), or `train()` -> (vq, measured) saved there; a new
    VQ makes every later stage stale (its codes changed)."""
    from diffusers import VQModel

    if cache.reusable("vq", "vq/config.json"):
        return VQModel.from_pretrained(cache.out / "vq").eval()
    vq, measured = train()
    vq.save_pretrained(cache.out / "vq")
    cache.record("vq", measured, first=True)
    return vq


def prior_stage(cache: StageCache, train: Callable[[], tuple[Any, Any, dict]]) -> tuple[Any, Any]:
    """(prior, tokenizer) saved in the cache (prior/), or `train()` -> (prior, tokenizer,
    measured) saved there."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    where = cache.out / "prior"
    if cache.reusable("prior", "prior/config.json", after=("vq",)):
        prior = LlamaForCausalLM.from_pretrained(where).eval()
        return prior, PreTrainedTokenizerFast.from_pretrained(where)
    prior, tok, measured = train()
    prior.save_pretrained(where)
    tok.save_pretrained(where)
    cache.record("prior", measured)
    return prior, tok
