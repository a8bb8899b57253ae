"""PASTA (Zhang et al., ICLR 2024): steer chosen heads toward user-highlighted spans.

On the recipe's heads, every key outside the highlighted spans gets a logit
bias of ``log alpha``; the highlighted tokens gain attention and rows
renormalise. Spans come with the input: text between the recipe's markers
(``<<like this>>`` by default) or character ranges.
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from attnedit.recipe import InterventionSpec
from attnedit.tables import SPAN, Bias, KeySet

from .registry import register


class PastaSpec(InterventionSpec):
    type: Literal["pasta"]
    alpha: float = Field(default=0.01, gt=0, le=1, description="attention multiplier of keys outside the spans")
    markers: tuple[str, str] = Field(default=("<<", ">>"), description="open and close markers of a highlighted span")

    SUMMARY: ClassVar[str] = "PASTA: log(alpha) logit bias on keys outside highlighted spans"

    @field_validator("markers")
    @classmethod
    def _distinct(cls, v):
        if not v[0] or not v[1] or v[0] == v[1]:
            raise ValueError("markers are two different, non-empty strings: [open, close]")
        return v


@register("pasta", schema=PastaSpec, summary=PastaSpec.SUMMARY, needs_spans=True)
def compile(spec: PastaSpec, info, model=None) -> list:
    bias = math.log(spec.alpha)
    return [Bias(layer, tuple(heads), KeySet(off=SPAN), bias) for layer, heads in spec.targets(info).items()]
