"""Head pruning (PH3, Jin et al., 2024, and friends): silence chosen heads.

A pruned head's output before ``o_proj`` is multiplied by 0 (``ablation: zero``)
or replaced by its mean over a reference set (``ablation: mean``; the means are
stored in the recipe, one vector of head_dim values per pruned head). Static:
zero ablation folds into ``o_proj`` on export.
"""
from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from attnedit.recipe import InterventionSpec
from attnedit.tables import Scale

from .registry import register


class HeadPruneSpec(InterventionSpec):
    type: Literal["head_prune"]
    ablation: Literal["zero", "mean"] = "zero"
    means: dict[int, dict[int, list[float]]] | None = Field(
        default=None, description="for ablation: mean, {layer: {head: [head_dim floats]}} over a reference set"
    )

    SUMMARY: ClassVar[str] = "Head pruning: zero or mean-ablate chosen heads (PH3 memory/context heads)"

    @model_validator(mode="after")
    def _means_given(self):
        if self.ablation == "mean" and not self.means:
            raise ValueError("ablation 'mean' needs 'means': {layer: {head: [head_dim floats]}} (attnedit calibrate writes them)")
        if self.ablation == "zero" and self.means:
            raise ValueError("'means' is only used with ablation: mean")
        return self

    def check_method_model(self, info):
        problems = []
        if self.ablation != "mean":
            return problems
        for layer, heads in self.targets(info).items():
            have = (self.means or {}).get(layer, {})
            for h in heads:
                if h not in have:
                    problems.append((("means",), f"no mean for layer {layer} head {h}"))
                elif len(have[h]) != info.head_dim:
                    problems.append((("means", layer, h), f"has {len(have[h])} values; the model's head_dim is {info.head_dim}"))
        return problems


@register("head_prune", schema=HeadPruneSpec, summary=HeadPruneSpec.SUMMARY)
def compile(spec: HeadPruneSpec, info, model=None) -> list:
    out = []
    for layer, heads in spec.targets(info).items():
        shift = None
        if spec.ablation == "mean":
            shift = torch.tensor([spec.means[layer][h] for h in heads], dtype=torch.float32)
        out.append(Scale(layer, tuple(heads), 0.0, shift))
    return out
