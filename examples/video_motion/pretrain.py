"""Pre-training of the AR video example's tiny models, cached under one folder
(default runs/video_motion_base):

    vq/      diffusers VQModel, 16×16 RGB frame -> 4×4 codes (factor 4); clips are coded frame
             by frame (grpo_ar.adapters.vq.PerFrameVQ): 8 frames = 128 codes
    prior/   LlamaForCausalLM over [<bos> colour shape moves direction | 128 codes] + its
             word-level tokenizer, trained on clips whose captions are partly wrong (`mislabel`)
    judge.safetensors  the held-out judge of motion-following (judge.py): a tiny 3D CNN that
             names a clip's direction, trained on VQ-decoded clips with their true directions
    meta.json  the settings of every stage (the cache key) and their measurements

Each stage is reused when meta.json holds the same settings for it and everything before it.

    python examples/video_motion/pretrain.py --out runs/video_motion_base
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as video_motion.*: no clash
# with other examples' modules of the same name (pretrain.py) in one process
from ar_common.pretraining import (  # noqa: E402
    StageCache,
    decode_codes,
    log,
    main,
    prior_stage,
    train_prior,
    train_vq,
    vq_stage,
)
from ar_common.pretraining import settings as stage_settings  # noqa: E402
from video_motion.clips import COLOURS, DIRECTIONS, SHAPES, make_clips, prompt_split  # noqa: E402
from video_motion.judge import DirectionJudge, measure_judge, train_judge  # noqa: E402

from grpo_ar.testing import word_level_tokenizer  # noqa: E402

DATA = {"n_train": 4000, "mislabel": 0.6, "seed": 0}
VQ = {"steps": 1200, "batch_size": 64, "lr": 2e-3, "codebook": 128, "channels": [16, 32, 32]}
PRIOR = {"steps": 1500, "batch_size": 32, "lr": 2e-3, "hidden": 96, "layers": 3,
         "p_uncond": 0.1, "input_noise": 0.05}  # fmt: skip
JUDGE = {"steps": 400, "batch_size": 64, "lr": 2e-3, "width": 12, "test_seed": 1}
WORDS = ("<pad>", "<bos>", "<eos>", *COLOURS, *SHAPES, "moves", *DIRECTIONS)  # 14 ids
PROMPT_LEN = 5  # <bos> colour shape moves direction


# ------------------------------------------------------------------------------------------ VQ
# (trained by ar_common.pretraining.train_vq, through `patch_latents`)
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


def clip_decode(vq: Any, codes: Tensor, batch: int = 256) -> Tensor:
    """(N, F, h, w) codes -> (N, F, 3, H, W) in [0, 1] (the adapter's decoding path)."""
    from grpo_ar.adapters.vq import DiffusersVQ, PerFrameVQ

    return decode_codes(PerFrameVQ(DiffusersVQ(vq)), codes, batch)


# --------------------------------------------------------------------------------------- prior
def build_tokenizer() -> Any:
    """Word-level tokenizer over WORDS: "<bos> red ball moves left" (pad 0, bos 1, eos 2)."""
    return word_level_tokenizer(WORDS)


def caption_ids(tokenizer: Any, data: dict[str, Tensor]) -> Tensor:
    """(N, 5) prompt ids of the clips' captions ("<bos> colour shape moves <said>")."""
    rows = zip(data["colour"].tolist(), data["shape"].tolist(), data["said"].tolist())
    texts = [f"{COLOURS[c]} {SHAPES[s]} moves {DIRECTIONS[d]}" for c, s, d in rows]
    return torch.tensor(tokenizer(texts)["input_ids"])


# ------------------------------------------------------------------------------------ pipeline
def settings(**overrides: Any) -> dict[str, dict[str, Any]]:
    """Stage settings (the cache key): {"data", "vq", "prior", "judge"}, each updated by
    overrides."""
    return stage_settings({"data": DATA, "vq": VQ, "prior": PRIOR, "judge": JUDGE}, **overrides)


def pretrain(out_dir: str | Path, threads: int = 1, verbose: bool = True,
             **overrides: Any) -> dict[str, Any]:  # fmt: skip
    """Train (or reuse) the VQ tokenizer and the prior; returns the folder, meta and models."""
    cache = StageCache(out_dir, settings(**overrides), verbose, threads)
    st, d = cache.st, cache.st["data"]
    data = functools.cache(lambda: make_clips(d["n_train"], d["seed"], d["mislabel"]))
    vq = vq_stage(cache, lambda: train_vq(data()["clips"].flatten(0, 1), seed=d["seed"],
                                          verbose=verbose, log_every=250, encode=patch_latents,
                                          **st["vq"]))  # fmt: skip

    def new_prior() -> tuple[Any, Any, dict]:
        tok = build_tokenizer()
        prior, measured = train_prior(
            tok, caption_ids(tok, data()), clip_codes(vq, data()["clips"]), seed=d["seed"],
            verbose=verbose, codebook=st["vq"]["codebook"], log_every=250, **st["prior"],
        )  # fmt: skip
        return prior, tok, measured

    prior, tok = prior_stage(cache, new_prior)
    judge = judge_stage(cache, vq, data, verbose)
    return cache.ready(vq=vq, prior=prior, tokenizer=tok, judge=judge)


def judge_stage(cache: StageCache, vq: Any, data: Any, verbose: bool) -> DirectionJudge:
    """The judge saved in the cache (judge.safetensors), or trained on the VQ-decoded training
    clips (their true directions) and measured on fresh clips of render seed `test_seed`."""
    from safetensors.torch import load_file, save_file

    st = cache.st["judge"]
    if cache.reusable("judge", "judge.safetensors", after=("vq",)):
        judge = DirectionJudge(st["width"])
        judge.load_state_dict(load_file(cache.out / "judge.safetensors"))
        return judge.eval()
    decode = lambda x: clip_decode(vq, clip_codes(vq, x))  # noqa: E731
    kw = {k: v for k, v in st.items() if k != "test_seed"}
    judge, measured = train_judge(decode(data()["clips"]), data()["direction"],
                                  seed=cache.st["data"]["seed"], verbose=verbose, **kw)  # fmt: skip
    make = lambda n, seed, prompts: make_clips(n, seed, prompts=prompts)  # noqa: E731
    measured["accuracy"] = measure_judge(judge, make, decode, st["test_seed"], prompt_split()[1])
    log(verbose, f"judge accuracy on fresh clips: {measured['accuracy']}")
    save_file(judge.state_dict(), cache.out / "judge.safetensors")
    cache.record("judge", measured)
    return judge


if __name__ == "__main__":
    main(pretrain, __doc__, "runs/video_motion_base")
