"""ZeroTuning (Han et al., 2025): scale the attention every row pays to its first token.

``A'_i0 = gamma * A_i0 / D``, ``A'_ij = A_ij / D``, ``D = 1 + (gamma - 1) A_i0``:
exactly a logit bias of ``log gamma`` on the row's first real token, at every
forward including decoding. gamma > 1 flattens the rest of the row, gamma < 1
sharpens it.
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import Field

from attnedit.recipe import InterventionSpec
from attnedit.tables import FIRST, Bias, KeySet

from .registry import register


class ZeroTuningSpec(InterventionSpec):
    type: Literal["zerotuning"]
    gamma: float = Field(gt=0, le=1e4, description="multiplier of the attention to the first token")

    SUMMARY: ClassVar[str] = "ZeroTuning: log(gamma) logit bias on each row's first real token"


@register("zerotuning", schema=ZeroTuningSpec, summary=ZeroTuningSpec.SUMMARY)
def compile(spec: ZeroTuningSpec, info, model=None) -> list:
    bias = math.log(spec.gamma)
    return [Bias(layer, tuple(heads), KeySet(on=FIRST), bias) for layer, heads in spec.targets(info).items()]
