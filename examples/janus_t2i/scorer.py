"""The example's reward model: a tiny transformers `CLIPModel` trained here, saved as a folder the
`pickscore` reward loads by path (model + processor in one folder, like PickScore_v1 with the
laion processor), so GRPO's reward goes through the PickScore code path unchanged.

Two losses on (caption, image) pairs of VQ-reconstructed shapes:
- contrastive (CLIP's): each image against the 30 captions, temperature logit_scale;
- preference (PickScore's Bradley-Terry on pairs of the same caption): the image the image
  example's `aesthetic_proxy` rates higher should score higher. The proxy is the teacher, so
  the scorer prefers vivid renderings over washed / dark / grey ones of the same prompt.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from grpo_ar.rewards.image import aesthetic_proxy_score
from grpo_ar.rewards.learned import features

SCORER_SIDE = 16  # the shapes' size: the processor's resize and crop are identities


def scorer_tokenizer() -> Any:
    """Word-level tokenizer over the 11 words: "<bos> colour shape <eos>", right-padded; EOS
    is the highest id, where CLIP's text model pools (config.eos_token_id)."""
    from image_aesthetic.shapes import COLOURS, SHAPES
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", *COLOURS, *SHAPES, "<eos>"]
    vocab = {w: i for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", padding_side="right")  # fmt: skip


def build_scorer(tok: Any, hidden: int, seed: int) -> Any:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=4)  # fmt: skip
    text = dict(vocab_size=len(tok), max_position_embeddings=8, bos_token_id=1,
                eos_token_id=tok.eos_token_id, pad_token_id=0, **common)  # fmt: skip
    vision = dict(image_size=SCORER_SIDE, patch_size=4, **common)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=hidden))


def train_scorer(data: dict[str, Tensor], out: Path, steps: int, batch_size: int, lr: float,
                 hidden: int, pref_weight: float, seed: int,
                 verbose: bool = True) -> dict[str, Any]:  # fmt: skip
    """Train on `data` (images in [0, 1], colour, shape) and save model, tokenizer and image
    processor in `out`; measures caption accuracy and preference agreement on held-out pairs."""
    from ar_common.pretraining import log, log_step, optimizer_step, scheduled
    from image_aesthetic.shapes import PROMPTS, SHAPES
    from transformers import CLIPImageProcessorPil

    from grpo_ar.rewards.clip import ClipPreprocess

    tok = scorer_tokenizer()
    proc = CLIPImageProcessorPil(size={"shortest_edge": SCORER_SIDE},
                              crop_size={"height": SCORER_SIDE, "width": SCORER_SIDE})  # fmt: skip
    pre, model = ClipPreprocess.from_processor(proc), build_scorer(tok, hidden, seed).train()
    texts = tok(list(PROMPTS), padding=True, return_tensors="pt")
    x_all = data["images"]
    label = data["colour"] * len(SHAPES) + data["shape"]  # (N,) index into PROMPTS
    teacher = aesthetic_proxy_score(x_all, torch.ones(5))  # (N,)
    by_prompt = [(label == k).nonzero().flatten() for k in range(len(PROMPTS))]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched, t0 = scheduled(opt, steps), time.perf_counter()
    for step in range(steps):
        i = torch.randint(0, len(x_all), (batch_size,))
        j = torch.stack([by_prompt[k][torch.randint(0, len(by_prompt[k]), ())] for k in label[i]])
        s = scores_all(model, pre, torch.cat([x_all[i], x_all[j]]), texts)  # (2B, 30)
        clip_loss = F.cross_entropy(s[: len(i)], label[i])
        own = s.gather(1, torch.cat([label[i], label[j]])[:, None])[:, 0]  # (2B,)
        prefer = (teacher[i] > teacher[j]).float() * 2 - 1
        margin = own[: len(i)] - own[len(i) :]
        pref_loss = -F.logsigmoid(prefer * margin).mean()
        optimizer_step(opt, sched, clip_loss + pref_weight * pref_loss)
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # CLIP's cap of 100
        log_step(verbose, "score", step, steps, 100, clip_loss + pref_loss, t0, digits=3)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    proc.save_pretrained(out)
    measured = {"seconds": round(time.perf_counter() - t0, 1), **check_scorer(model, pre, texts)}
    log(verbose, f"scorer: {measured}")
    return measured


def scores_all(model: Any, pre: Any, x: Tensor, texts: Any) -> Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, n_texts) PickScore scores logit_scale.exp() · cos."""
    img = F.normalize(features(model.get_image_features(pixel_values=pre(x))), dim=-1)
    txt = F.normalize(features(model.get_text_features(**texts)), dim=-1)
    return model.logit_scale.exp() * img @ txt.T


@torch.no_grad()
def check_scorer(model: Any, pre: Any, texts: Any, n: int = 600) -> dict[str, float]:
    """On fresh images (seed 99): caption accuracy and agreement with the proxy's preferences
    between two renderings of the same caption (pairs whose proxy scores differ by > 0.05)."""
    from image_aesthetic.shapes import PROMPTS, SHAPES, make_images, render

    a = make_images(n, 99, SCORER_SIDE)
    g = torch.Generator().manual_seed(100)
    style = torch.randint(0, 4, (n,), generator=g)
    xb = render(a["colour"], a["shape"], style, SCORER_SIDE, g)  # same captions, other renderings
    sa, sb = scores_all(model, pre, a["images"], texts), scores_all(model, pre, xb, texts)
    lab = a["colour"] * len(SHAPES) + a["shape"]
    acc = (sa.argmax(-1) == lab).float().mean().item()
    ta, tb = (aesthetic_proxy_score(x, torch.ones(5)) for x in (a["images"], xb))
    own_a, own_b = sa.gather(1, lab[:, None])[:, 0], sb.gather(1, lab[:, None])[:, 0]
    keep = (ta - tb).abs() > 0.05
    agree = ((own_a > own_b) == (ta > tb))[keep].float().mean().item()
    return {"caption_acc": acc, "pref_agreement": agree, "prompts": len(PROMPTS)}


def load_scorer(path: str | Path) -> Any:
    """The `pickscore` reward on the saved folder (model and processor), on the CPU."""
    from grpo_ar.rewards.pickscore import PickScore

    return PickScore(model=str(path), processor=str(path), device="cpu")
