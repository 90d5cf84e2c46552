"""Pre-training of the plan-then-image example, cached under one folder (default
runs/plan_then_image_base):

    vq/, classifier.safetensors   the image example's VQ and its colour/shape classifier, same
                 settings and code (image_aesthetic.pretrain): the held-out judge
    reward_classifier.safetensors  a second classifier of the same kind, trained on other images
                 (this example's plan data, another seed): the reward's, so that GRPO optimising
                 the reward does not optimise the judge itself
    prior/       LlamaForCausalLM over [BOS, prompt words, plan words, 64 codes] + its word-level
                 tokenizer: it learns both the plan given the prompt and the image given the plan
    meta.json    every stage's settings (the cache key) and measurements

    python examples/plan_then_image/pretrain.py --out runs/plan_then_image_base
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
from ar_common.pretraining import (  # noqa: E402
    StageCache,
    log_step,
    main,
    optimizer_step,
    prior_stage,
    scheduled,
    train_vq,
    vq_stage,
)
from ar_common.pretraining import settings as stage_settings  # noqa: E402
from image_aesthetic.pretrain import (  # noqa: E402
    CLS,
    DATA,
    VQ,
    ShapeClassifier,
    check_classifier,
    train_classifier,
    vq_codes,
    vq_decode,
)
from image_aesthetic.shapes import make_images  # noqa: E402
from plan_then_image.plans import CODE_OFFSET, PROMPTS, WORDS, make_plan_data  # noqa: E402

from grpo_ar.testing import causal_lm, lm_config, word_level_tokenizer  # noqa: E402

PRIOR = {"steps": 1200, "batch_size": 32, "lr": 3e-3, "hidden": 96, "layers": 3,
         "n_train": 12000, "data_seed": 1}  # fmt: skip
RCLS = {"steps": 500, "batch_size": 128, "lr": 3e-3, "n_train": 6000, "n_test": 2000, "seed": 7}


def build_tokenizer() -> Any:
    """Word-level tokenizer over WORDS ("<bos> warm sharp", pad 0, bos 1, eos 2)."""
    return word_level_tokenizer(WORDS)


def sequences(tokenizer: Any, data: dict[str, Tensor], codes: Tensor) -> Tensor:
    """(N, 5 + h·w) rows [BOS, colour family, shape family, plan colour, plan shape, codes]."""
    from image_aesthetic.shapes import COLOURS, SHAPES

    words = [
        f"{PROMPTS[p]} {COLOURS[c]} {SHAPES[s]}"
        for p, c, s in zip(data["prompt"].tolist(), data["colour"].tolist(), data["shape"].tolist())
    ]
    ids = torch.tensor([tokenizer(w)["input_ids"] for w in words])  # (N, 5), BOS first
    return torch.cat([ids, codes.flatten(1) + CODE_OFFSET], 1)


def train_plan_prior(seqs: Tensor, n_prompt: int, steps: int, batch_size: int, lr: float,
                     hidden: int, layers: int, codebook: int, seed: int,
                     verbose: bool = True) -> tuple[Any, dict]:  # fmt: skip
    """Next-token prediction on (N, L) rows after their `n_prompt` prompt tokens: the plan words
    and the codes (no CFG-unconditional rows: typed spans sample without CFG)."""
    torch.manual_seed(seed)
    cfg = lm_config(CODE_OFFSET + codebook, hidden, layers, kv_heads=4, mlp=4 * hidden,
                    max_positions=seqs.shape[1] + 8, tie_word_embeddings=False)  # fmt: skip
    model = causal_lm(cfg).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest,
                             "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))  # fmt: skip
    sched = scheduled(opt, steps)
    t0 = time.perf_counter()
    for step in range(steps):
        x = seqs[torch.randint(0, len(seqs), (batch_size,))]  # (B, L)
        logits = model(input_ids=x).logits[:, n_prompt - 1 : -1]  # (B, L - n_prompt, V)
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, n_prompt:].flatten())
        optimizer_step(opt, sched, loss, clip=model.parameters())
        log_step(verbose, "prior", step, steps, 100, loss, t0, digits=3)
    return model.eval(), {"seconds": round(time.perf_counter() - t0, 1), "loss": loss.item()}


def settings(**overrides: Any) -> dict[str, dict[str, Any]]:
    """Stage settings (the cache key): the image example's data / vq / cls, this example's
    rcls and prior; each updated by overrides."""
    base = {"data": DATA, "vq": VQ, "cls": CLS, "rcls": RCLS, "prior": PRIOR}
    return stage_settings(base, **overrides)


def _classifier(cache: StageCache, name: str, file: str, train: Any) -> ShapeClassifier:
    from safetensors.torch import load_file, save_file

    if cache.reusable(name, file, after=("vq",)):
        net = ShapeClassifier()
        net.load_state_dict(load_file(cache.out / file))
        return net.eval()
    net, measured = train()
    save_file(net.state_dict(), cache.out / file)
    cache.record(name, measured)
    return net


def reward_classifier(vq: Any, r: dict[str, Any], size: int,
                      verbose: bool) -> tuple[ShapeClassifier, dict]:  # fmt: skip
    """The judge's recipe on this example's plan images (seed `r["seed"]`), another init."""
    data = make_plan_data(r["n_train"], r["seed"], size)
    rec = {**data, "images": vq_decode(vq, vq_codes(vq, data["images"]))}
    kw = {k: r[k] for k in ("steps", "batch_size", "lr")}
    cls = train_classifier(rec, seed=r["seed"], verbose=verbose, **kw)
    test = make_images(r["n_test"], r["seed"] + 1, size)
    rec_test = vq_decode(vq, vq_codes(vq, test["images"]))
    return cls, {"acc_vq": cls.accuracy(rec_test, test["colour"], test["shape"])}


def pretrain(out_dir: str | Path, threads: int = 1, verbose: bool = True,
             **overrides: Any) -> dict[str, Any]:  # fmt: skip
    """Train (or reuse) VQ, judge, reward classifier and plan prior; the loaded models."""
    cache = StageCache(out_dir, settings(**overrides), verbose, threads)
    st, d, pr = cache.st, cache.st["data"], cache.st["prior"]
    data = functools.cache(lambda: make_images(d["n_train"], d["seed"], d["size"]))
    vq = vq_stage(cache, lambda: train_vq(data()["images"], seed=d["seed"], verbose=verbose,
                                          **st["vq"]))  # fmt: skip
    judge = _classifier(cache, "cls", "classifier.safetensors",
                        lambda: check_classifier(vq, data(), st, verbose))  # fmt: skip
    rcls = _classifier(cache, "rcls", "reward_classifier.safetensors",
                       lambda: reward_classifier(vq, st["rcls"], d["size"], verbose))  # fmt: skip

    def new_prior() -> tuple[Any, Any, dict]:
        tok = build_tokenizer()
        plan_data = make_plan_data(pr["n_train"], pr["data_seed"], d["size"])
        seqs = sequences(tok, plan_data, vq_codes(vq, plan_data["images"]))
        kw = {k: v for k, v in pr.items() if k not in ("n_train", "data_seed")}
        prior, measured = train_plan_prior(seqs, 3, codebook=st["vq"]["codebook"],
                                           seed=pr["data_seed"], verbose=verbose, **kw)  # fmt: skip
        return prior, tok, measured

    prior, tok = prior_stage(cache, new_prior)
    return cache.ready(vq=vq, classifier=judge, reward_classifier=rcls, prior=prior, tokenizer=tok)


if __name__ == "__main__":
    main(pretrain, __doc__, "runs/plan_then_image_base")
