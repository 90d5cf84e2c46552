"""Image codes that are named tokens of a text vocabulary (Chameleon / Lumina-mGPT, Emu3).

Those models keep the VQ codebook inside the BPE vocabulary under their own names
(`IMGIMG…Z`, `<|visual token 000123|>`) and wrap an image in layout tokens: begin/end of image,
grid-size tokens, a token ending every row. `MappedLayout` is a `CodeLayout` whose code i is the
vocabulary's token for code i (in whatever order the names put them) and whose layout tokens
(`head`, per-row `eol`, `eof`, `tail`) are forced at their positions; `token_id` looks a
layout token up by name with an error that says which token is missing.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .code_grid import TextCondition
from .codes import CodeLayout, check_codes


def token_id(vocab: Mapping[str, int], name: str, what: str) -> int:
    """The id of token `name` in `vocab`; a ValueError naming `what` it is for when missing."""
    if name not in vocab:
        raise ValueError(
            f"the vocabulary has no {what} token {name!r}; give the token this checkpoint uses "
            "for it (config.vocabulary_map / the tokenizer lists the names)"
        )
    return int(vocab[name])


def codes_in_order(img2bpe: Mapping[int, int], what: str) -> list[int]:
    """LM token id of each VQ code, by code index, from a family's `img2bpe` (code -> BPE id);
    refuses a mapping whose codes are not exactly 0..n-1 (`what` names the tokens)."""
    if sorted(img2bpe) != list(range(len(img2bpe))):
        raise ValueError(
            f"the vocabulary's {len(img2bpe)} {what} do not name codes 0..{len(img2bpe) - 1}"
        )
    return [img2bpe[c] for c in range(len(img2bpe))]


@dataclass(frozen=True)
class MappedLayout(CodeLayout):
    """A code grid whose code i is LM token `code_ids[i]`, wrapped in forced layout tokens:
    `head` (e.g. Lumina-mGPT's grid-size tokens), the grid (with `eol` after every row and
    `eof` after it, as in `CodeLayout`), then `tail` (end-of-image, EOS). The code ids may come
    in any order but must fill one block of consecutive ids (the range sampling allows);
    build with `MappedLayout.build`."""

    code_ids: tuple[int, ...] = ()
    """LM token id of each code, by code index."""
    head: tuple[int, ...] = ()
    """Layout tokens before the grid."""
    tail: tuple[int, ...] = ()
    """Layout tokens after the grid (after `eof` when given)."""

    @classmethod
    def build(
        cls,
        grid: Sequence[int],
        code_ids: Sequence[int],
        eol: int | None = None,
        eof: int | None = None,
        head: Sequence[int] = (),
        tail: Sequence[int] = (),
    ) -> MappedLayout:
        """The layout of `grid` with code i at LM id `code_ids[i]` (offset and codebook size
        follow from the ids)."""
        if not code_ids:
            raise ValueError("no image-token ids: the vocabulary holds no image tokens")
        ids = tuple(int(t) for t in code_ids)
        return cls(tuple(grid), min(ids), len(ids), eol, eof, ids, tuple(head), tuple(tail))

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.code_ids) != self.codebook_size:
            raise ValueError(
                f"{len(self.code_ids)} code ids for a codebook of {self.codebook_size}; build "
                "the layout with MappedLayout.build(grid, code_ids, ...)"
            )
        lo, hi = self.code_range
        if sorted(self.code_ids) != list(range(lo, hi)):
            raise ValueError(
                f"the {self.codebook_size} image-token ids are not one block of consecutive "
                f"ids (they span [{lo}, {max(self.code_ids) + 1})); sampling restricts codes to "
                "one id range, so such a vocabulary is not supported"
            )
        for tok in (*self.head, *self.tail):
            if lo <= tok < hi:
                raise ValueError(f"layout token {tok} is an image-code id in [{lo}, {hi})")

    @functools.cached_property
    def template(self) -> Tensor:
        """(num_tokens,) long: head, the grid's template (-1 at codes), tail."""
        grid = vars(CodeLayout)["template"].func(self)  # the parent's computation, uncached
        return torch.cat([torch.tensor(self.head, dtype=torch.long), grid,
                          torch.tensor(self.tail, dtype=torch.long)])  # fmt: skip

    @functools.cached_property
    def rank_code(self) -> Tensor:
        """(K,) long: the code of LM id `code_offset + r` at index r."""
        out = torch.empty(self.codebook_size, dtype=torch.long)
        out[torch.tensor(self.code_ids) - self.code_offset] = torch.arange(self.codebook_size)
        return out

    def to_codes(self, ids: Tensor) -> Tensor:
        """(N, n) LM token ids -> (N, *grid) VQ codes; refuses a wrong count, a layout token out
        of place or a non-image token where a code belongs."""
        if ids.ndim != 2 or ids.shape[1] != self.num_tokens:
            raise ValueError(
                f"got {tuple(ids.shape)} tokens; the grid {self.grid} needs "
                f"(N, {self.num_tokens}) (codes and layout tokens)"
            )
        template = self.template.to(ids.device)
        wrong = (template >= 0) & (ids != template)
        if wrong.any():
            i, t = wrong.nonzero()[0].tolist()
            raise ValueError(
                f"expected layout token {int(template[t])} at sample {i}, position {t}, got "
                f"{int(ids[i, t])}; sample with the adapter's sampling.position_ranges"
            )
        ranks = super().to_codes(ids)  # code-range check; id - code_offset
        return self.rank_code.to(ranks.device)[ranks]

    def to_ids(self, codes: Tensor) -> Tensor:
        """(N, *grid) VQ codes -> (N, num_tokens) LM ids, layout tokens in place."""
        check_codes(codes, self.codebook_size, self.grid)
        ranks = torch.tensor(self.code_ids, device=codes.device)[codes] - self.code_offset
        return super().to_ids(ranks)


class ImageStartCondition(TextCondition):
    """Text prompts whose CFG unconditional prompt is empty: the unconditional branch sees only
    the image-start tokens (`image_prefix_ids`) and its own image tokens, as Lumina-mGPT's
    image-start-triggered guidance does (its uncond context starts at `<racm3:break>`)."""

    def __init__(self, tokenizer: Any, template: str = "{prompt}", **kw: Any) -> None:
        super().__init__(tokenizer, template, uncond="negative", **kw)

    def uncond(self, entry: Any, cond: list[int]) -> list[int]:
        return []
