"""An example method that only composes existing effect kinds: a logit bias on each row's first token.

It is the whole of what adding such a method takes (with its test, tests/evals/test_example_method.py):
a schema, a compile step, an optional search, and one declaration. The test registers it
(`registry.register(METHOD)`) and takes it off again; a built-in method's module calls `register` itself.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from attnedit.interventions.calibration import SCORED_TASKS, Calibration, Found, best, need_scorer, recipe_of, score_all
from attnedit.interventions.registry import Method, Param, Search
from attnedit.recipe import InterventionSpec
from attnedit.tables import FIRST, Bias, KeySet


class FirstBiasSpec(InterventionSpec):
    type: Literal["first_bias"]
    value: float = Field(default=1.0, ge=-20, le=20, description="logit bias on each row's first real token")


def compile(spec: FirstBiasSpec, info, model=None) -> list:
    return [Bias(layer, tuple(heads), KeySet(on=FIRST), spec.value) for layer, heads in spec.targets(info).items()]


def find(spec: FirstBiasSpec, cal: Calibration) -> Found:
    """The best bias of a grid (``--param values=...``), or nothing when none beats the unpatched model."""
    baseline = float(need_scorer(cal, "first_bias")(None))
    values = cal.options.get("values", (-1.0, 1.0))
    candidates = [({"value": v}, recipe_of(spec.model_copy(update={"value": v}))) for v in values]
    records = score_all(cal, candidates, "first-token bias")
    top = best(records, baseline)
    specs = [spec.model_copy(update={"value": top["candidate"]["value"]})] if top else []
    return Found(specs, records, top, baseline)


METHOD = Method(
    name="first_bias",
    schema=FirstBiasSpec,
    compile=compile,
    summary="First-token bias: a fixed logit bias on each row's first real token",
    emits=(Bias,),
    search=Search(
        find=find,
        about="the best bias of a grid",
        scores_on=SCORED_TASKS,
        params=(Param("values", float, "the grid of biases", (-1.0, 1.0), ge=-20, le=20, many=True),),
    ),
)
