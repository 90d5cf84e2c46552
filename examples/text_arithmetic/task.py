"""Text arithmetic task: char-level tokenizer, problem generator, tiny Llama, pass@k evaluation.

Everything is built locally (no hub): the tokenizer from the `tokenizers` library, the model from
a random-init `LlamaConfig`. Prompts look like `"23+58="`, answers like `"81"` (or `"-35"`).
"""

from __future__ import annotations

import hashlib
import random
import re

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<bos>", "<eos>")
CHARS = "0123456789+-*= "


def build_tokenizer(chars: str = CHARS) -> PreTrainedTokenizerFast:
    """One token per character of `chars`, plus <pad>/<bos>/<eos>; <bos> is prepended on encode."""
    vocab = {t: i for i, t in enumerate([*SPECIALS, *dict.fromkeys(chars)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    # Every character is its own pre-token (spaces included); Fuse joins them back without gaps.
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        padding_side="left",
    )


def _split_of(prompt: str, heldout_frac: float) -> str:
    """Stable train/test assignment from a hash of the problem string (independent of seed)."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") / 2**64
    return "test" if h < heldout_frac else "train"


def make_problems(
    n: int,
    seed: int,
    split: str = "train",
    n_terms: int = 2,
    max_operand: int = 99,
    ops: str = "+-",
    heldout_frac: float = 0.1,
    unique: bool = False,
) -> list[dict[str, str]]:
    """`n` rows {"prompt": "23-58=", "answer": "-35"} of `split` ("train"/"test"), seeded.

    Problems are drawn i.i.d. (repeats possible; `unique=True` skips them, e.g. for a held-out
    set); a problem's split is decided by its hash, so train and test never share a problem
    whatever the seeds.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}; use 'train' or 'test'")
    rng = random.Random(f"{seed}-{split}")
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for _ in range(1000 * n + 100_000):
        if len(rows) == n:
            return rows
        terms = [str(rng.randint(0, max_operand))]
        for _ in range(n_terms - 1):
            terms += [rng.choice(ops), str(rng.randint(0, max_operand))]
        expr = "".join(terms)
        prompt = expr + "="
        if _split_of(prompt, heldout_frac) == split and not (unique and prompt in seen):
            seen.add(prompt)
            rows.append({"prompt": prompt, "answer": str(eval(expr))})  # digits and + - * only
    raise ValueError(
        f"found only {len(rows)} of n={n} {'distinct ' if unique else ''}{split} problems; "
        "lower n, or raise max_operand / n_terms / heldout_frac"
    )


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 512,
    max_positions: int = 64,
    tie_embeddings: bool = True,
) -> LlamaForCausalLM:
    """A tiny random-init Llama whose special-token ids match `tokenizer`."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def completion_text(ids: list[int], tokenizer: PreTrainedTokenizerFast) -> str:
    """Generated ids -> text up to (excluding) the first <eos>."""
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def is_correct(completion: str, answer: str) -> float:
    """1.0 when the completion (whitespace stripped) is exactly the answer's integer, else 0.0."""
    text = completion.strip()
    return float(re.fullmatch(r"-?\d+", text) is not None and int(text) == int(answer))


@torch.no_grad()
def generate(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[str],
    greedy: bool = True,
    samples: int = 1,
    max_new_tokens: int = 6,
    temperature: float = 1.0,
) -> list[list[str]]:
    """Completions per prompt: `samples` of them (len(prompts) lists of `samples` strings)."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(
        **enc,
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_k=None,
        top_p=None,
        num_return_sequences=samples,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # (B*samples, T_prompt + T_new), each prompt's samples contiguous
    texts = [
        completion_text(row, tokenizer) for row in out[:, enc["input_ids"].shape[1] :].tolist()
    ]
    return [texts[i * samples : (i + 1) * samples] for i in range(len(prompts))]


def accuracy(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    rows: list[dict[str, str]],
    greedy: bool = True,
    samples: int = 1,
    max_new_tokens: int = 6,
    temperature: float = 1.0,
    batch_size: int = 64,
) -> dict[str, float]:
    """{"pass@1", f"pass@{k}", f"mixed@{k}"} over `rows`, k = samples (only pass@1 when k = 1).

    pass@1 is the mean correctness over all samples (greedy accuracy when greedy). pass@k is the
    fraction of prompts with at least one correct sample: the ceiling GRPO sharpens towards.
    mixed@k is the fraction with some but not all correct: the GRPO groups whose advantages are
    non-zero, i.e. that carry a learning signal.
    """
    was_training = model.training
    model.eval()
    hits: list[list[float]] = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        outs = generate(
            model,
            tokenizer,
            [r["prompt"] for r in chunk],
            greedy,
            samples,
            max_new_tokens,
            temperature,
        )
        hits += [[is_correct(c, r["answer"]) for c in cs] for cs, r in zip(outs, chunk)]
    model.train(was_training)
    result = {"pass@1": sum(sum(h) / len(h) for h in hits) / len(hits)}
    if samples > 1:
        result[f"pass@{samples}"] = sum(max(h) for h in hits) / len(hits)
        result[f"mixed@{samples}"] = sum(0 < sum(h) < len(h) for h in hits) / len(hits)
    return result
