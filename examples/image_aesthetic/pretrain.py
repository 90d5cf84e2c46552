"""Pre-training of the example's tiny models, cached under one folder (default runs/image_aesthetic_base):

    vq/          diffusers VQModel, 16×16 RGB -> 8×8 codes (factor 2), trained on the shapes
    prior/       LlamaForCausalLM over [BOS, colour, shape, 64 codes] + its word-level tokenizer
    classifier.safetensors   tiny CNN (colour head, shape head) on VQ reconstructions: the
                 "still looks like its prompt" check (the held-out judge)
    reward_classifier.safetensors   a second, independent CNN of the same kind (other images,
                 other seed, only the GRPO training prompts): the `prompt_fidelity` reward
    meta.json    the settings of every stage (the cache key) and their measurements

Each stage is reused when meta.json holds the same settings for it and everything before it.

    python examples/image_aesthetic/pretrain.py --out runs/image_aesthetic_base
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ (see run.py)
from ar_common.pretraining import (  # noqa: E402
    StageCache,
    decode_codes,
    log,
    log_step,
    main,
    optimizer_step,
    prior_stage,
    scheduled,
    train_prior,
    train_vq,
    vq_stage,
)
from ar_common.pretraining import settings as stage_settings  # noqa: E402
from image_aesthetic.shapes import COLOURS, SHAPES, make_images, prompt_split  # noqa: E402

from grpo_ar.testing import word_level_tokenizer  # noqa: E402

VQ = {"steps": 800, "batch_size": 32, "lr": 2e-3, "codebook": 256, "channels": [16, 32]}
PRIOR = {"steps": 1200, "batch_size": 32, "lr": 3e-3, "hidden": 96, "layers": 3, "p_uncond": 0.1}
CLS = {"steps": 500, "batch_size": 128, "lr": 3e-3, "n_test": 2000}
# the reward's classifier: its own images (another seed, GRPO training prompts only) and init
RCLS = {"steps": 500, "batch_size": 128, "lr": 3e-3, "n_train": 6000, "n_test": 2000, "seed": 7}
DATA = {"n_train": 12000, "size": 16, "seed": 0}
WORDS = ("<pad>", "<bos>", "<eos>", *COLOURS, *SHAPES)  # 14 ids, under CODE_OFFSET


# ------------------------------------------------------------------------------------------ VQ
# (trained by ar_common.pretraining.train_vq: whole images through the encoder)
@torch.no_grad()
def vq_codes(vq: Any, images: Tensor, batch: int = 512) -> Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, h, w) long codes."""
    out = []
    for i in range(0, len(images), batch):
        lat = vq.encode(images[i : i + batch] * 2 - 1).latents
        _, _, (_, _, idx) = vq.quantize(lat)
        out.append(idx.reshape(lat.shape[0], *lat.shape[2:]))
    return torch.cat(out)


def vq_decode(vq: Any, codes: Tensor, batch: int = 512) -> Tensor:
    """(N, h, w) codes -> (N, 3, H, W) in [0, 1] (the same path as the adapter's DiffusersVQ)."""
    from grpo_ar.adapters.vq import DiffusersVQ

    return decode_codes(DiffusersVQ(vq), codes, batch)


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
    sched = scheduled(opt, steps)
    x_all, c_all, s_all = data["images"], data["colour"], data["shape"]
    for step in range(steps):
        i = torch.randint(0, len(x_all), (batch_size,))
        c, s = net(x_all[i])
        loss = F.cross_entropy(c, c_all[i]) + F.cross_entropy(s, s_all[i])
        optimizer_step(opt, sched, loss)
        log_step(verbose, "cls", step, steps, 100, loss)
    return net.eval()


# --------------------------------------------------------------------------------------- prior
def build_tokenizer() -> Any:
    """Word-level tokenizer over WORDS: "<bos> colour shape" (pad 0, bos 1, eos 2)."""
    return word_level_tokenizer(WORDS)


def prompt_ids(tokenizer: Any, data: dict[str, Tensor]) -> Tensor:
    """(N, 3) prompt ids of the images' labels: "<bos> colour shape"."""
    words = torch.tensor([tokenizer.convert_tokens_to_ids([COLOURS[c], SHAPES[s]])
                          for c, s in zip(data["colour"].tolist(), data["shape"].tolist())])  # fmt: skip
    return torch.cat([torch.full((len(words), 1), tokenizer.bos_token_id), words], 1)


# ------------------------------------------------------------------------------------ pipeline
def settings(**overrides: Any) -> dict[str, dict[str, Any]]:
    """Stage settings (the cache key): {"data", "vq", "cls", "prior", "rcls"}, each updated by
    overrides."""
    base = {"data": DATA, "vq": VQ, "cls": CLS, "prior": PRIOR, "rcls": RCLS}
    return stage_settings(base, **overrides)


def pretrain(out_dir: str | Path, threads: int = 1, verbose: bool = True,
             **overrides: Any) -> dict[str, Any]:  # fmt: skip
    """Train (or reuse) VQ, judge classifier, prior and reward classifier; returns paths, meta and
    the loaded models."""
    from safetensors.torch import load_file, save_file

    cache = StageCache(out_dir, settings(**overrides), verbose, threads)
    st, d = cache.st, cache.st["data"]
    data = functools.cache(lambda: make_images(d["n_train"], d["seed"], d["size"]))
    vq = vq_stage(cache, lambda: train_vq(data()["images"], seed=d["seed"], verbose=verbose,
                                          **st["vq"]))  # fmt: skip
    if cache.reusable("cls", "classifier.safetensors", after=("vq",)):
        cls = ShapeClassifier()
        cls.load_state_dict(load_file(cache.out / "classifier.safetensors"))
        cls.eval()
    else:
        cls, measured = check_classifier(vq, data(), st, verbose)
        save_file(cls.state_dict(), cache.out / "classifier.safetensors")
        cache.record("cls", measured)

    def new_prior() -> tuple[Any, Any, dict]:
        tok = build_tokenizer()
        prior, measured = train_prior(
            tok, prompt_ids(tok, data()), vq_codes(vq, data()["images"]), seed=d["seed"],
            verbose=verbose, codebook=st["vq"]["codebook"], **st["prior"],
        )  # fmt: skip
        return prior, tok, measured

    prior, tok = prior_stage(cache, new_prior)
    if cache.reusable("rcls", "reward_classifier.safetensors", after=("vq",)):
        rcls = ShapeClassifier()
        rcls.load_state_dict(load_file(cache.out / "reward_classifier.safetensors"))
        rcls.eval()
    else:
        rcls, measured = reward_classifier(vq, st, verbose)
        save_file(rcls.state_dict(), cache.out / "reward_classifier.safetensors")
        cache.record("rcls", measured)
    return cache.ready(vq=vq, classifier=cls, prior=prior, tokenizer=tok, reward_classifier=rcls)


def check_classifier(vq: Any, data: dict[str, Tensor], st: dict[str, dict[str, Any]],
                     verbose: bool) -> tuple[ShapeClassifier, dict]:  # fmt: skip
    """Train the classifier on VQ reconstructions of the training images; measure it on fresh
    images, as pixels and as VQ reconstructions."""
    d = st["data"]
    rec = {**data, "images": vq_decode(vq, vq_codes(vq, data["images"]))}
    kw = {k: v for k, v in st["cls"].items() if k != "n_test"}
    cls = train_classifier(rec, seed=d["seed"], verbose=verbose, **kw)
    test = make_images(st["cls"]["n_test"], d["seed"] + 1, d["size"])
    rec_test = vq_decode(vq, vq_codes(vq, test["images"]))
    measured = {
        "acc_pixels": cls.accuracy(test["images"], test["colour"], test["shape"]),
        "acc_vq": cls.accuracy(rec_test, test["colour"], test["shape"]),
    }
    log(verbose, f"classifier accuracy on fresh images (pixels / VQ): {measured}")
    return cls, measured


def reward_classifier(vq: Any, st: dict[str, dict[str, Any]], verbose: bool,
                      codes: Callable[[Any, Tensor], Tensor] = vq_codes,
                      decode: Callable[[Any, Tensor], Tensor] = vq_decode,
                      what: str = "VQ-reconstructed images") -> tuple[ShapeClassifier, dict]:  # fmt: skip
    """The `prompt_fidelity` reward's classifier: the judge's recipe on other images (seed
    `rcls.seed`, only GRPO's training prompts) from another init, so that GRPO optimising it
    does not optimise the held-out judge itself. Trained and measured on `decode(vq,
    codes(vq, images))` reconstructions (`what`, for the log) of fresh images of the training
    and of the held-out prompts."""
    r, size = st["rcls"], st["data"]["size"]
    train_prompts, held = prompt_split()
    data = make_images(r["n_train"], r["seed"], size, prompts=train_prompts)
    rec = {**data, "images": decode(vq, codes(vq, data["images"]))}
    kw = {k: r[k] for k in ("steps", "batch_size", "lr")}
    cls = train_classifier(rec, seed=r["seed"], verbose=verbose, **kw)
    measured = {}
    for name, prompts in (("acc_vq_train_prompts", train_prompts), ("acc_vq_heldout", held)):
        test = make_images(r["n_test"], r["seed"] + 1, size, prompts=prompts)
        rec_test = decode(vq, codes(vq, test["images"]))
        measured[name] = cls.accuracy(rec_test, test["colour"], test["shape"])
    log(verbose, f"reward classifier accuracy on fresh {what}: {measured}")
    return cls, measured


if __name__ == "__main__":
    main(pretrain, __doc__, "runs/image_aesthetic_base")
