"""What of a recipe folds into a model's weights, exactly, and what stays dynamic.

Each intervention is folded or kept dynamic as a whole. One that compiles to
output scales only (head pruning with zero ablation, VHR with fixed heads)
folds into ``o_proj``: head h owns input columns ``h*D:(h+1)*D``, so
``W @ (a * o_h) = (a * W[:, h*D:(h+1)*D]) @ o_h``; a shift (mean ablation)
folds into ``o_proj``'s bias, where the model has one.

Why folding is exact. In a head, biases and moves act on the attention map,
and output maps ``x -> a x + b`` act on the head's output afterwards, in
recipe order, before ``o_proj`` (`attnedit.tables`). Folding moves an output
map to the very end. That commutes with every edit of the map, and with a
later output map ``x -> c x + d`` that stays dynamic iff ``d (1 - a) = b (1 - c)``;
where it does not, the earlier intervention stays dynamic. An intervention that
runs extra forwards or reads weights to compile (and so would see the folded
weights when it is rebuilt at load) keeps the whole recipe dynamic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnedit.interventions import registry

from . import tables as T
from .errors import AttneditError
from .modelinfo import ModelInfo, decoder_layers
from .recipe import Recipe


@dataclass(frozen=True)
class Edit:
    """What the export does with one intervention of the recipe.

    Attributes:
        index: its position in the recipe.
        type: its method.
        folded: True if it is in the weights, False if attnedit applies it at load.
        how: one line saying how it was folded or why it stays dynamic.
        targets: {layer: [query heads]} it touches on this model.
    """

    index: int
    type: str
    folded: bool
    how: str
    targets: dict[int, list[int]]

    COLUMNS: ClassVar[tuple[str, ...]] = ("#", "type", "layers", "heads", "status")

    @property
    def n_heads(self) -> int:
        return sum(len(h) for h in self.targets.values())

    def row(self) -> list[str]:
        """Cells under `Edit.COLUMNS`."""
        return [str(self.index), self.type, str(len(self.targets)), str(self.n_heads), self.how]

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "type": self.type,
            "how": self.how,
            "layers": len(self.targets),
            "heads": self.n_heads,
        }


@dataclass(frozen=True)
class ExportPlan:
    """A recipe split for one model: what folds into which `o_proj`, what stays dynamic.

    Attributes:
        recipe: the whole recipe with every `auto` resolved.
        edits: one `Edit` per intervention, in recipe order.
        fold: {layer: LayerPlan} of the folded output maps (out_scale (H,), out_shift (H, D) or None).
        info: the model's shape.
    """

    recipe: Recipe
    edits: tuple[Edit, ...]
    fold: dict[int, T.LayerPlan]
    info: ModelInfo

    @property
    def folded(self) -> list[Edit]:
        return [e for e in self.edits if e.folded]

    @property
    def dynamic(self) -> list[Edit]:
        return [e for e in self.edits if not e.folded]

    def dynamic_recipe(self) -> Recipe | None:
        """The interventions attnedit applies at load, or None when everything folded."""
        keep = tuple(self.recipe.interventions[e.index] for e in self.dynamic)
        return self.recipe.replace(interventions=keep) if keep else None


def plan_export(model: torch.nn.Module, recipe: Recipe) -> ExportPlan:
    """Split a recipe into folded and dynamic interventions for `model` (nothing is written).

    Args:
        model: the loaded, unpatched model.
        recipe: the recipe to export.
    Returns:
        An `ExportPlan`.
    Raises:
        RecipeError: the recipe does not fit the model.
        AttneditError: an `auto` value that attnedit cannot resolve for export.
    """
    info = ModelInfo.from_config(model.config, name=model_name(model))
    recipe.check_model(info)
    compiled = [list(registry.get(s.type).compile(s, info, model)) for s in recipe.interventions]
    recipe = _resolve_auto(recipe, compiled, info)
    why = {i: _why_dynamic(spec, out, model, info) for i, (spec, out) in enumerate(zip(recipe.interventions, compiled))}
    folded = {i for i, reason in why.items() if reason is None}
    conflicts = _order_conflicts(compiled, folded, recipe, info)
    why.update(conflicts)
    folded -= conflicts.keys()
    blocker = _sees_weights(compiled, folded, recipe, info)
    if blocker:
        why.update({i: blocker for i in folded})
        folded = set()
    edits = tuple(
        Edit(i, spec.type, i in folded, _how_folded(compiled[i]) if i in folded else why[i], spec.targets(info))
        for i, spec in enumerate(recipe.interventions)
    )
    plans = T.build_plans([e for i in sorted(folded) for e in compiled[i]], info).layers
    fold = {layer: p for layer, p in plans.items() if p.out_scale is not None}  # a scale of 1 leaves o_proj alone
    return ExportPlan(recipe, edits, fold, info)


def _resolve_auto(recipe: Recipe, compiled: list[list], info: ModelInfo) -> Recipe:
    """The recipe with every 'auto' that compiling resolves from the weights written out.

    A method that finds an 'auto' in the weights when it compiles declares how to write the result
    (`Method.resolve`: VAR's sink dimensions). An 'auto' left in a spec whose compile step does not
    read the weights is a per-input choice made at run time (VHR's heads) and stays; any other is refused.
    """
    specs, problems = [], []
    for i, (spec, out) in enumerate(zip(recipe.interventions, compiled)):
        method = registry.get(spec.type)
        if method.resolve is not None:
            spec = type(spec).model_validate(method.resolve(spec, out).model_dump())
        left = [k for k, v in spec.model_dump().items() if isinstance(v, str) and v == "auto"]
        if left and method.reads_weights(spec):
            problems += [
                f"interventions[{i}].{k} ({spec.type}): 'auto' is searched in the weights when the recipe compiles "
                "and export cannot write the result; give the value explicitly"
                for k in left
            ]
        specs.append(spec)
    if problems:
        raise AttneditError("cannot export this recipe faithfully:\n" + "\n".join(f"  {p}" for p in problems))
    return recipe.replace(interventions=tuple(specs))


def _why_dynamic(spec, out: list, model, info: ModelInfo) -> str | None:
    """Why one intervention's compiled effects cannot fold into o_proj, or None if they can."""
    kinds = sorted({e.KIND for e in out if not isinstance(e, T.Scale)})
    if kinds:
        return "dynamic: " + ", ".join(kinds) + " (applied at every forward)"
    if registry.get(spec.type).fold is None:
        return f"dynamic: {spec.type} does not fold into weights"
    for e in out:
        lin = out_proj(model, e.layer, info)
        if lin is None:
            return f"dynamic: layer {e.layer} has no o_proj of input size {info.n_heads * info.head_dim} to fold into"
        if lin.weight.device.type == "meta" or not lin.weight.dtype.is_floating_point:
            return f"dynamic: o_proj of layer {e.layer} is offloaded or quantised"
        if e.shift is not None and lin.bias is None:
            return "dynamic: a mean shift folds only into an o_proj bias, which this model lacks"
    return None


def _output_maps(out: list, info: ModelInfo) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (a (H,), b (H, D))}: the intervention's output map x -> a x + b per head."""
    plans = T.build_plans([e for e in out if isinstance(e, T.Scale)], info).layers
    H, D = info.n_heads, info.head_dim
    return {
        layer: (p.out_scale, p.out_shift if p.out_shift is not None else torch.zeros(H, D))
        for layer, p in plans.items()
        if p.out_scale is not None
    }


def _order_conflicts(compiled: list[list], folded: set[int], recipe: Recipe, info: ModelInfo) -> dict[int, str]:
    """Folding candidates whose output map does not commute with a later dynamic one (until none is left)."""
    maps = [_output_maps(out, info) for out in compiled]
    folded, reasons = set(folded), {}
    changed = True
    while changed:
        changed = False
        for i in sorted(folded):
            for j in range(i + 1, len(compiled)):
                clash = None if j in folded else _clash(maps[i], maps[j])
                if clash is not None:
                    layer, head = clash
                    reasons[i] = (
                        f"dynamic: its output scale on layer {layer} head {head} comes before the output map of "
                        f"interventions[{j}] ({recipe.interventions[j].type}) and does not commute with it"
                    )
                    folded.discard(i)
                    changed = True
                    break
    return reasons


def _clash(first: dict, later: dict) -> tuple[int, int] | None:
    """(layer, head) where a x + b (first) and c x + d (later) do not commute: d (1 - a) != b (1 - c)."""
    for layer in sorted(first.keys() & later.keys()):
        a, b = first[layer]
        c, d = later[layer]
        bad = (d * (1 - a)[:, None] != b * (1 - c)[:, None]).any(1)
        if bad.any():
            return layer, int(bad.nonzero()[0])
    return None


def _sees_weights(compiled: list[list], folded: set[int], recipe: Recipe, info: ModelInfo) -> str | None:
    """Why nothing may fold: a dynamic intervention runs forwards or reads weights that folding changes."""
    if not folded:
        return None
    for j, (spec, out) in enumerate(zip(recipe.interventions, compiled)):
        if j in folded:
            continue
        if any(isinstance(e, T.ForwardHook) for e in out):
            return (
                f"dynamic: interventions[{j}] ({spec.type}) computes per-input statistics, which would see folded "
                "weights"
            )
        if registry.get(spec.type).reads_weights(spec):
            return (
                f"dynamic: interventions[{j}] ({spec.type}) reads the weights when it compiles, which folding would "
                "change"
            )
    return None


def _how_folded(out: list) -> str:
    heads = sum(len(e.heads) for e in out)
    if not heads:
        return "folded: no effect on this model"
    scales = sorted({e.scale for e in out})
    what = "output scale " + "/".join(f"{s:g}" for s in scales)
    if any(e.shift is not None for e in out):
        return f"folded: {what} and mean shift on {heads} heads -> o_proj columns and bias"
    return f"folded: {what} on {heads} heads -> o_proj columns"


def out_proj(model, layer: int, info: ModelInfo) -> torch.nn.Linear | None:
    """The layer's attention output projection, if it is a Linear over the H*D head outputs."""
    attn = decoder_layers(model)[layer].self_attn
    for name in ("o_proj", "out_proj", "dense"):
        lin = getattr(attn, name, None)
        if isinstance(lin, torch.nn.Linear) and lin.in_features == info.n_heads * info.head_dim:
            return lin
    return None


def folded_weights(
    lin: torch.nn.Linear, plan: T.LayerPlan, info: ModelInfo
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """o_proj's weight (and bias) with the layer's output maps folded in.

    ``o_proj(a * o + b) = (W * a_cols) o + (bias + W b)``, computed in fp32 and cast back.
    Returns (weight (hidden, H*D), bias (hidden,) or None when unchanged).
    """
    w = lin.weight.detach().float()
    cols = plan.out_scale.to(w.device).repeat_interleave(info.head_dim)  # (H*D,): head h owns columns h*D:(h+1)*D
    weight = (w * cols).to(lin.weight.dtype)
    if plan.out_shift is None:
        return weight, None
    bias = lin.bias.detach().float() + w @ plan.out_shift.to(w.device).reshape(-1)
    return weight, bias.to(lin.bias.dtype)


def model_name(model) -> str:
    """How the model was named when it was loaded ('' for a model built in memory)."""
    return getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or ""
