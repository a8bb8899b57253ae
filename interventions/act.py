"""ACT, attention calibration (Yu et al., ICML 2024): shrink attention sinks, give the mass back.

Per input and head, at prefill: key j (not the row's first token) is a sink
when its column score ``sum_i A_ij / (rows that see j)`` exceeds tau. In every
row, sinks keep ``beta`` of their attention and the freed mass goes to the
non-sink keys of the row in proportion to their weight (rows still sum to 1).
Sinks found at prefill are kept for the generated tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field

from attnedit.recipe import InterventionSpec, LayerSel
from attnedit.tables import ACTSINK, Detect, KeySet, MoveEffect

from .registry import register


class ActSpec(InterventionSpec):
    type: Literal["act"]
    beta: float = Field(default=0.4, ge=0, le=1, description="fraction of a sink's attention that is kept")
    tau: float = Field(default=0.1, gt=0, le=1, description="column-score threshold above which a key is a sink")

    layers: LayerSel = "2:-1"  # layers 2 .. L-2

    SUMMARY: ClassVar[str] = "ACT: reduce detected attention sinks by beta, redistribute to the other keys"


@dataclass(frozen=True, eq=False)
class ActSinks:
    """Sink detection from column scores; `tau` (H,) per query head, NaN where the head does not detect."""

    tau: torch.Tensor
    flag: int = ACTSINK
    where: str = "attention"

    def detect(self, colsum: torch.Tensor, count: torch.Tensor, first_key: torch.Tensor) -> torch.Tensor:
        """(B, H, K) colsum, (B, 1|H, K) count, (B,) first key -> (B, H, K) bool sinks."""
        B, H, K = colsum.shape
        score = colsum / count.clamp_min(1.0)
        tau = self.tau.to(colsum.device).view(1, H, 1)
        sink = (score > tau) & (count > 0)  # NaN tau compares False
        keys = torch.arange(K, device=colsum.device).view(1, 1, K)
        return sink & (keys != first_key.view(B, 1, 1))

    def merge(self, other: "ActSinks") -> "ActSinks":
        tau = torch.where(torch.isnan(other.tau), self.tau, other.tau)
        return ActSinks(tau)


@register("act", schema=ActSpec, summary=ActSpec.SUMMARY)
def compile(spec: ActSpec, info, model=None) -> list:
    out = []
    for layer, heads in spec.targets(info).items():
        tau = torch.full((info.n_heads,), float("nan"))
        tau[heads] = spec.tau
        out.append(Detect(layer, ActSinks(tau)))
        out.append(MoveEffect(layer, tuple(heads), KeySet(on=ACTSINK), KeySet(off=ACTSINK), spec.beta))
    return out
