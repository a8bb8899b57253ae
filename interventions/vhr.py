"""VHR, vision-aware head reinforcement (He et al., ACL 2025): amplify vision-aware heads.

Selected heads' outputs are multiplied by alpha at every position, prefill and
decoding. The heads are given in the recipe (for instance found offline by
`attnedit calibrate`).
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from attnedit.recipe import InterventionSpec, LayerSel
from attnedit.tables import Scale

from .registry import register


class VhrSpec(InterventionSpec):
    type: Literal["vhr"]
    layers: LayerSel = [1, "-14:"]  # layer 1 and the last 14
    alpha: float = Field(default=2.0, gt=0, le=100, description="multiplier of a selected head's output")

    SUMMARY: ClassVar[str] = "VHR: multiply the outputs of vision-aware heads by alpha"

    def check_method_model(self, info):
        if not info.is_vlm:
            return [(("type",), f"VHR needs a vision-language model with image tokens; {info.name} ({info.model_type}) has no image token id")]
        return []


@register("vhr", schema=VhrSpec, summary=VhrSpec.SUMMARY)
def compile(spec: VhrSpec, info, model=None) -> list:
    return [Scale(layer, tuple(heads), spec.alpha) for layer, heads in spec.targets(info).items()]
