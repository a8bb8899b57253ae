"""PASTA (Zhang et al., ICLR 2024): steer chosen heads toward user-highlighted spans.

On the recipe's heads, every prompt key outside the highlighted spans gets a
logit bias of ``log alpha``; the highlighted tokens gain attention and rows
renormalise. As in the authors' ``scale_position="exclude"`` mode, only keys of
the prompt are biased: tokens generated after it are left alone.

Spans come with the input: text between the recipe's markers (``<<like
this>>`` by default) or character ranges. `prepare` strips the markers,
tokenizes with offsets and returns the token spans for `Patch.set_spans`::

    enc, spans = pasta.prepare(tokenizer, ["Mary is a doctor. <<Answer in JSON.>>"], recipe)
    with attnedit.patch(model, recipe, spans=spans):
        out = model.generate(**enc)
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

from pydantic import Field, field_validator

from attnedit.errors import AttneditError
from attnedit.recipe import InterventionSpec
from attnedit.tables import SPAN, Bias, KeySet

from .registry import Method, register

DEFAULT_MARKERS = ("<<", ">>")
# Generated tokens sit at positions >= the prompt length; flagging them as "span"
# keeps them unbiased, like the authors' code, which biases keys [0, input_len) only.
_OPEN_END = 2**62


class PastaSpec(InterventionSpec):
    type: Literal["pasta"]
    alpha: float = Field(default=0.01, gt=0, le=1, description="attention multiplier of prompt keys outside the spans")
    markers: tuple[str, str] = Field(
        default=DEFAULT_MARKERS, description="open and close markers of a highlighted span"
    )

    @field_validator("markers")
    @classmethod
    def _distinct(cls, v):
        if not v[0] or not v[1] or v[0] == v[1]:
            raise ValueError("markers are two different, non-empty strings: [open, close]")
        return v


def compile(spec: PastaSpec, info, model=None) -> list:
    bias = math.log(spec.alpha)
    return [Bias(layer, tuple(heads), KeySet(off=SPAN), bias) for layer, heads in spec.targets(info).items()]


# --------------------------------------------------------------------------- prompts with highlighted spans


def strip_markers(
    text: str, markers: tuple[str, str] = DEFAULT_MARKERS, row: int = 0
) -> tuple[str, list[tuple[int, int]]]:
    """Remove span markers from `text`.

    Args:
        text: a prompt with spans written as ``<open>span<close>``; spans do not nest.
        markers: (open, close).
        row: the prompt's index, for error messages.
    Returns:
        (clean text, character ranges [start, stop) of the spans in the clean text).
    Raises:
        AttneditError: a close marker without an open one, an open marker that does not close,
            a nested open marker, or an empty span.
    """
    open_m, close_m = markers
    out, ranges, i, start = [], [], 0, None
    n_out = 0
    while i < len(text):
        if text.startswith(open_m, i):
            if start is not None:
                raise AttneditError(
                    f"prompt {row}: span marker {open_m!r} at character {i} opens inside another span "
                    f"(spans do not nest)"
                )
            start, i = n_out, i + len(open_m)
        elif text.startswith(close_m, i):
            if start is None:
                raise AttneditError(
                    f"prompt {row}: span marker {close_m!r} at character {i} closes a span that was never opened"
                )
            if n_out == start:
                raise AttneditError(f"prompt {row}: empty span {open_m}{close_m} at character {i - len(open_m)}")
            ranges.append((start, n_out))
            start, i = None, i + len(close_m)
        else:
            out.append(text[i])
            n_out += 1
            i += 1
    if start is not None:
        raise AttneditError(f"prompt {row}: span marker {open_m!r} is never closed with {close_m!r}")
    return "".join(out), ranges


def token_spans(
    offsets: Sequence[tuple[int, int]], ranges: Sequence[tuple[int, int]], row: int = 0
) -> list[tuple[int, int]]:
    """Token ranges [start, stop) covering character ranges: every token whose characters overlap the range.

    Special tokens (empty offsets) never count. Raises AttneditError when a range covers no token.
    """
    spans = []
    for lo, hi in ranges:
        hit = [t for t, (a, b) in enumerate(offsets) if b > a and a < hi and b > lo]
        if not hit:
            raise AttneditError(f"prompt {row}: character range [{lo}, {hi}) covers no token")
        spans.append((hit[0], hit[-1] + 1))
    return spans


def prepare(
    tokenizer,
    texts: str | Sequence[str],
    recipe_or_markers=None,
    *,
    ranges: Sequence[Sequence[tuple[int, int]]] | None = None,
    add_special_tokens: bool = True,
    return_tensors: str = "pt",
):
    """Tokenize prompts with highlighted spans for PASTA.

    Args:
        tokenizer: a Hugging Face tokenizer with offsets (a fast tokenizer), or a processor holding one.
        texts: one prompt or a list. Spans are marked in the text, or given by `ranges`.
        recipe_or_markers: a `Recipe` (its first PASTA intervention's markers), a (open, close) pair,
            or None for the default ``("<<", ">>")``.
        ranges: instead of markers: per prompt, character ranges [start, stop) of the spans
            (the texts are then used as they are).
        add_special_tokens: passed to the tokenizer (False when a chat template already added them).
        return_tensors: passed to the tokenizer.
    Returns:
        (encoding, spans): the left-padded batch encoding (`input_ids`, `attention_mask`) and, per row,
        token ranges [start, stop) indexing its `input_ids` (padding included), for `Patch.set_spans` or
        `attnedit.patch(..., spans=spans)`. Each row also gets the open range after the prompt, so
        that generated tokens are not biased.
    Raises:
        AttneditError: markers that do not close, ranges outside a text, a span that covers no token,
            or a tokenizer without offsets.
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    texts = [texts] if isinstance(texts, str) else list(texts)
    if ranges is None:
        markers = _markers(recipe_or_markers)
        parsed = [strip_markers(t, markers, row) for row, t in enumerate(texts)]
    else:
        if len(ranges) != len(texts):
            raise AttneditError(f"ranges were given for {len(ranges)} prompts but there are {len(texts)}")
        parsed = [(t, _check_ranges(t, r, row)) for row, (t, r) in enumerate(zip(texts, ranges))]
    if not getattr(tok, "is_fast", False):
        raise AttneditError(f"{type(tok).__name__} gives no character offsets; PASTA needs a fast tokenizer")
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(
            [t for t, _ in parsed],
            return_offsets_mapping=True,
            padding=True,
            add_special_tokens=add_special_tokens,
            return_tensors=return_tensors,
        )
    finally:
        tok.padding_side = side
    offsets = enc.pop("offset_mapping")
    T = enc["input_ids"].shape[1]
    spans = []
    for row, (_, char_ranges) in enumerate(parsed):
        pad = T - int(enc["attention_mask"][row].sum())
        row_offsets = [tuple(map(int, o)) for o in offsets[row].tolist()]
        real = [o if t >= pad else (0, 0) for t, o in enumerate(row_offsets)]
        spans.append(token_spans(real, char_ranges, row) + [(T, _OPEN_END)])
    return enc, spans


def _markers(recipe_or_markers) -> tuple[str, str]:
    if recipe_or_markers is None:
        return DEFAULT_MARKERS
    if isinstance(recipe_or_markers, (tuple, list)) and len(recipe_or_markers) == 2:
        return tuple(recipe_or_markers)
    for spec in getattr(recipe_or_markers, "interventions", ()):
        if isinstance(spec, PastaSpec):
            return spec.markers
    return DEFAULT_MARKERS


def _check_ranges(text: str, ranges, row: int) -> list[tuple[int, int]]:
    out = []
    for r in ranges:
        lo, hi = int(r[0]), int(r[1])
        if not 0 <= lo < hi <= len(text):
            raise AttneditError(f"prompt {row}: character range {tuple(r)} is not inside the text (length {len(text)})")
        out.append((lo, hi))
    return out


METHOD = register(
    Method(
        name="pasta",
        schema=PastaSpec,
        compile=compile,
        summary="PASTA: log(alpha) logit bias on prompt keys outside highlighted spans",
        emits=(Bias,),
        spans=prepare,  # prompts with spans marked in the text
    )
)
