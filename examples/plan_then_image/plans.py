"""The plan-then-image task: under-specified prompts, the concrete plans they allow, and the data.

A prompt names a colour family and a shape family ("warm sharp"); a plan is a concrete
"<colour> <shape>" inside both families ("red triangle"); the image then shows the plan. As in
T2I-R1's BiCoT, the plan is a short text written before the image tokens, in one completion.
The pre-training data draws each prompt's plan from a skewed distribution (`plan_probs`), so the
prior starts with a preference among plans that is not the one the reward prefers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/ (see run.py)
from image_aesthetic.shapes import COLOURS, SHAPES, STYLE_PROBS, render  # noqa: E402

# adjacent hues in pairs: every colour belongs to two families; the first member is the likely one
COLOUR_FAMILIES = {
    "warm": ("red", "yellow"), "fresh": ("yellow", "green"), "sea": ("green", "cyan"),
    "cold": ("cyan", "blue"), "royal": ("blue", "magenta"), "rosy": ("magenta", "red"),
}  # fmt: skip
SHAPE_FAMILIES = {"soft": ("circle", "stripes"), "sharp": ("square", "triangle", "cross")}
MEMBER_PROBS = {2: (0.75, 0.25), 3: (0.6, 0.3, 0.1)}  # by family size, in listed order
# <pad> <bos> <eos>, then the plan words (ids 3..13, one contiguous range), then the prompt words
WORDS = ("<pad>", "<bos>", "<eos>", *COLOURS, *SHAPES, *COLOUR_FAMILIES, *SHAPE_FAMILIES)
PLAN_RANGE = (3, 3 + len(COLOURS) + len(SHAPES))  # half-open ids of the plan span's words
CODE_OFFSET = 32  # LM id of code 0: the 22 words rounded up
PROMPTS = tuple(f"{c} {s}" for c in COLOUR_FAMILIES for s in SHAPE_FAMILIES)


def parse(prompt: str) -> tuple[str, str]:
    """'warm sharp' -> ('warm', 'sharp'); refuses words that are not families."""
    words = prompt.split()
    if len(words) != 2 or words[0] not in COLOUR_FAMILIES or words[1] not in SHAPE_FAMILIES:
        raise ValueError(
            f"prompt {prompt!r}: write '<colour family> <shape family>' with families "
            f"{list(COLOUR_FAMILIES)} and {list(SHAPE_FAMILIES)}"
        )
    return words[0], words[1]


def is_heldout(prompt: str) -> bool:
    """3 of the 12 prompts GRPO never trains on; every family word still appears in training."""
    c, s = parse(prompt)
    return (list(COLOUR_FAMILIES).index(c) + list(SHAPE_FAMILIES).index(s)) % 4 == 0


def prompt_split() -> tuple[list[str], list[str]]:
    """(GRPO training prompts, held-out prompts)."""
    return [p for p in PROMPTS if not is_heldout(p)], [p for p in PROMPTS if is_heldout(p)]


def plan_probs(prompt: str) -> dict[tuple[str, str], float]:
    """The pre-training data's distribution of plans ("colour", "shape") for `prompt`."""
    c, s = parse(prompt)
    cols, shps = COLOUR_FAMILIES[c], SHAPE_FAMILIES[s]
    return {
        (col, shp): pc * ps
        for col, pc in zip(cols, MEMBER_PROBS[len(cols)])
        for shp, ps in zip(shps, MEMBER_PROBS[len(shps)])
    }


def satisfies(prompt: str, colour: int, shape: int) -> bool:
    """Whether colour / shape indices (into COLOURS, SHAPES) lie in the prompt's families."""
    c, s = parse(prompt)
    return COLOURS[colour] in COLOUR_FAMILIES[c] and SHAPES[shape] in SHAPE_FAMILIES[s]


def read_plan(words: list[str]) -> tuple[int, int] | None:
    """The plan span's two words -> (colour index, shape index); None when malformed."""
    if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES:
        return None
    return COLOURS.index(words[0]), SHAPES.index(words[1])


def make_plan_data(n: int, seed: int, size: int = 16) -> dict[str, Tensor]:
    """n examples: prompt uniform over PROMPTS, plan from `plan_probs`, style by STYLE_PROBS, the
    image rendered from the plan. {"prompt" (n,) index into PROMPTS, "colour", "shape", "style"
    (n,) long, "images" (n, 3, size, size) in [0, 1]}."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, len(PROMPTS), (n,), generator=g)
    colour, shape = torch.empty(n, dtype=torch.long), torch.empty(n, dtype=torch.long)
    for i, p in enumerate(PROMPTS):  # each prompt's rows draw from its own plan distribution
        rows = (prompt == i).nonzero().flatten()
        if len(rows) == 0:
            continue
        plans, probs = zip(*plan_probs(p).items())
        pick = torch.multinomial(torch.tensor(probs), len(rows), replacement=True, generator=g)
        colour[rows] = torch.tensor([COLOURS.index(plans[k][0]) for k in pick.tolist()])
        shape[rows] = torch.tensor([SHAPES.index(plans[k][1]) for k in pick.tolist()])
    style = torch.multinomial(torch.tensor(STYLE_PROBS), n, replacement=True, generator=g)
    chunks = [
        render(colour[i : i + 2048], shape[i : i + 2048], style[i : i + 2048], size, g)
        for i in range(0, n, 2048)
    ]
    images = torch.cat(chunks) if chunks else torch.zeros(0, 3, size, size)
    return {"prompt": prompt, "colour": colour, "shape": shape, "style": style, "images": images}


__all__ = [
    "CODE_OFFSET", "COLOUR_FAMILIES", "PLAN_RANGE", "PROMPTS", "SHAPE_FAMILIES", "WORDS",
    "is_heldout", "make_plan_data", "parse", "plan_probs", "prompt_split", "read_plan",
    "satisfies",
]  # fmt: skip
