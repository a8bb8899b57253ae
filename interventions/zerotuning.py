"""ZeroTuning (Han et al., 2025): scale the attention every row pays to its first token.

``A'_i0 = gamma * A_i0 / D``, ``A'_ij = A_ij / D``, ``D = 1 + (gamma - 1) A_i0``:
exactly a logit bias of ``log gamma`` on the row's first real token (with left
padding: the first non-padding token, where the authors' code scales column
0), at every forward including decoding. gamma > 1 flattens the rest of the
row, gamma < 1 sharpens it.

`find` is the paper's search: profile heads at a probe gamma (each head index
across the layers, as the authors' notebook does, or each layer, or each
(layer, head)), split them into up-effective (the score rises) and
down-effective heads, then score a gamma grid on all heads, the up-effective
and the down-effective heads (gamma > 1 for the up-effective, < 1 for the
down-effective heads, both for all heads). Supervised with accuracy on labelled examples,
or unsupervised with the model's output entropy on unlabelled prompts (the
scorer decides; see `attnedit calibrate --objective`).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

from pydantic import Field

from attnedit.errors import AttneditError
from attnedit.recipe import InterventionSpec
from attnedit.tables import FIRST, Bias, KeySet

from .calibration import SCORED_TASKS, Calibration, Found, best, need_scorer, recipe_of, score_all
from .registry import Method, Param, Search, register

# The authors' notebook sweeps 1..4 step 0.5; they use gamma < 1 for QA-like tasks (BoolQ: 0.3).
DEFAULT_GAMMAS = (0.3, 0.5, 0.7, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
PROFILES = ("head", "layer", "layer_head")


class ZeroTuningSpec(InterventionSpec):
    type: Literal["zerotuning"]
    gamma: float = Field(
        gt=0, le=1e4, description="multiplier of the attention to the first token (calibrate: the probe gamma)"
    )


def compile(spec: ZeroTuningSpec, info, model=None) -> list:
    bias = math.log(spec.gamma)
    return [Bias(layer, tuple(heads), KeySet(on=FIRST), bias) for layer, heads in spec.targets(info).items()]


def _units(spec: ZeroTuningSpec, info, profile: str) -> list[tuple[dict, dict[int, list[int]]]]:
    """The profiled units: (description, {layer: heads}) within the spec's targets."""
    targets = spec.targets(info)
    if profile == "layer":
        return [({"layer": layer}, {layer: heads}) for layer, heads in targets.items()]
    if profile == "layer_head":
        return [({"layer": layer, "head": h}, {layer: [h]}) for layer, heads in targets.items() for h in heads]
    heads = sorted({h for hs in targets.values() for h in hs})
    return [({"head": h}, {layer: [h] for layer, hs in targets.items() if h in hs}) for h in heads]


def _spec(heads: dict[int, list[int]], gamma: float) -> ZeroTuningSpec:
    """A spec for {layer: heads}; written as layers + one head list when every layer has the same heads."""
    lists = {tuple(sorted(hs)) for hs in heads.values()}
    if len(lists) == 1:
        (same,) = lists
        return ZeroTuningSpec(type="zerotuning", layers=sorted(heads), heads=list(same), gamma=gamma)
    return ZeroTuningSpec(
        type="zerotuning", heads={layer: sorted(hs) for layer, hs in sorted(heads.items())}, gamma=gamma
    )


def _compact(heads: dict[int, list[int]]):
    """{layer: heads} for the provenance, or {"layers": [...], "heads": [...]} when all layers share the heads."""
    lists = {tuple(hs) for hs in heads.values()}
    return {"layers": sorted(heads), "heads": list(next(iter(lists)))} if len(lists) == 1 else heads


def _union(maps: list[dict[int, list[int]]]) -> dict[int, list[int]]:
    out: dict[int, set[int]] = {}
    for m in maps:
        for layer, hs in m.items():
            out.setdefault(layer, set()).update(hs)
    return {layer: sorted(hs) for layer, hs in out.items()}


def find(spec: ZeroTuningSpec, cal: Calibration) -> Found:
    """ZeroTuning's search: head profiling at `spec.gamma`, then a gamma grid over head sets.

    Options (``cal.options``): ``profile`` (head | layer | layer_head, default head),
    ``gammas`` (the grid, default 0.3, 0.5, 0.7, 1.5 .. 4 step 0.5).

    Returns:
        A `Found` with the best (head set, gamma), or no spec when nothing beats the unpatched model.
    """
    profile = str(cal.options.get("profile", "head"))
    if profile not in PROFILES:
        raise AttneditError(f"zerotuning option profile={profile!r}; allowed: {', '.join(PROFILES)}")
    gammas = [float(g) for g in cal.options.get("gammas", DEFAULT_GAMMAS)]
    baseline = float(need_scorer(cal, "zerotuning")(None))
    units = _units(spec, cal.info, profile)
    probe = [({"stage": "profile", **desc, "gamma": spec.gamma}, recipe_of(_spec(m, spec.gamma))) for desc, m in units]
    profiled = score_all(cal, probe, "ZeroTuning head profiling")
    up = _union([m for (_, m), r in zip(units, profiled) if r["score"] > baseline])
    down = _union([m for (_, m), r in zip(units, profiled) if r["score"] < baseline])
    sets = {"all": spec.targets(cal.info), "up": up, "down": down}
    # up-effective heads gain from gamma > 1, down-effective ones from gamma < 1; all heads try both
    wanted = {"all": lambda g: True, "up": lambda g: g > 1, "down": lambda g: g < 1}
    grid = [
        ({"stage": "grid", "heads": name, "gamma": g}, recipe_of(_spec(heads, g)))
        for name, heads in sets.items()
        if heads
        for g in gammas
        if wanted[name](g)
    ]
    left = None if cal.max_candidates is None else max(0, cal.max_candidates - len(profiled))
    cal_grid = cal if left is None else _with_limit(cal, left)
    scored = score_all(cal_grid, grid, "ZeroTuning gamma grid")
    top = best(scored, baseline)
    specs = [_spec(sets[top["candidate"]["heads"]], top["candidate"]["gamma"])] if top else []
    notes = {
        "profile": profile,
        "probe_gamma": spec.gamma,
        "gammas": gammas,
        "up_effective": _compact(up) if up else {},
        "down_effective": _compact(down) if down else {},
    }
    return Found(specs, profiled + scored, top, baseline, notes, score=top["score"] if top else baseline)


def _with_limit(cal: Calibration, n: int) -> Calibration:
    return replace(cal, max_candidates=n)


METHOD = register(
    Method(
        name="zerotuning",
        schema=ZeroTuningSpec,
        compile=compile,
        summary="ZeroTuning: log(gamma) logit bias on each row's first real token",
        emits=(Bias,),
        search=Search(
            find=find,
            about="head profiling at the probe gamma, then a gamma grid over all, up- and down-effective heads",
            scores_on=SCORED_TASKS,
            params=(
                Param("profile", str, "what one profiled unit is", "head", choices=PROFILES),
                Param("gammas", float, "the gamma grid", DEFAULT_GAMMAS, gt=0, le=1e4, many=True),
            ),
        ),
    )
)
