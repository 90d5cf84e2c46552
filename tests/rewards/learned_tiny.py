"""Tiny local stand-ins for the learned image rewards' weights, tokenizers and processors, built
offline: a CLIPModel folder (PickScore's format), hpsv2's and ImageReward's checkpoints as
produced by their own code (tests/data, see the make_*.py beside them), a tiny Llava judge."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from tokenizers import pre_tokenizers

DATA = Path(__file__).parent.parent / "data"
WORDS = [
    "a",
    "cat",
    "dog",
    "red",
    "blue",
    "sky",
    "over",
    "the",
    "sea",
    "two",
    "on",
]  # tokenizer vocabularies of the tests


def original(name: str) -> tuple[dict, dict]:
    """(state dict in the original naming, {inputs and outputs of the original code})."""
    f = load_file(DATA / name)
    sd = {k[3:]: v for k, v in f.items() if k.startswith("sd.")}
    return sd, {k: v for k, v in f.items() if not k.startswith("sd.")}


def pil_images(n, size, seed=0):
    """Smooth colour fields plus noise, uint8 RGB PIL images of `size` (h, w)."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for _ in range(n):
        f = rng.uniform(1, 6, 3)
        base = np.stack([np.sin(f[c] * xx + c) * np.cos(f[(c + 1) % 3] * yy) for c in range(3)], -1)
        x = 128 + 90 * base + rng.normal(0, 20, (h, w, 3))
        out.append(Image.fromarray(x.clip(0, 255).astype(np.uint8)))
    return out


def save_clip(d: Path, side: int = 30, dim: int = 8, seed: int = 0) -> None:
    """A random CLIPModel, its CLIPTokenizer (byte-level, no merges) and CLIPImageProcessorPil
    (shortest edge / crop `side`) saved in `d`, the layout of PickScore / the laion processor."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for c in alphabet + [a + "</w>" for a in alphabet]:
        vocab[c] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(d)
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=24, bos_token_id=0,
                eos_token_id=1, pad_token_id=1)  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                  image_size=side, patch_size=10)  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=dim))
    with torch.no_grad():
        model.logit_scale.fill_(2.0)
    model.save_pretrained(d)
    proc = CLIPImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    proc.save_pretrained(d)


def word_tokenizer(specials: dict[str, int], size: int, template: str):
    """PreTrainedTokenizerFast: `specials` at their ids, WORDS after them, `template` (a
    TemplateProcessing single) around each text; padded with id 0 on the right."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = dict(specials)
    for w in WORDS:
        vocab[w] = min(set(range(size)) - set(vocab.values()))
    tk = Tokenizer(models.WordLevel(vocab, unk_token=[k for k, v in specials.items() if v == 0][0]))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    named = [(k, v) for k, v in specials.items() if k in template]
    tk.post_processor = processors.TemplateProcessing(single=template, special_tokens=named)
    pad = [k for k, v in specials.items() if v == 0][0]
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=pad, padding_side="right")


def hps_tokenizer():
    """open_clip's convention at the fixture's size (vocab 40): 0 pads, SOT 38, EOT 39 = top id."""
    tok = word_tokenizer({"!": 0, "<sot>": 38, "<eot>": 39}, 40, "<sot> $A <eot>")
    tok.eos_token = "<eot>"
    return tok


def bert_tokenizer():
    """BERT's convention at the ImageReward fixture's size (vocab 50): [PAD] 0, [CLS] 1, [SEP] 2."""
    return word_tokenizer({"[PAD]": 0, "[CLS]": 1, "[SEP]": 2}, 50, "[CLS] $A [SEP]")


def entries(prompts, name):
    from grpo_ar.rewards import RewardContext
    from grpo_ar.types import Entry, RewardSpec

    es = [Entry(p, (RewardSpec(name),)) for p in prompts]
    return RewardContext(es, list(range(len(es))), 1, 0)
