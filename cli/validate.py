"""attnedit validate: check a recipe, optionally against a model's config (no weights loaded)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from attnedit.errors import AttneditError, RecipeError

from .common import CacheOpt, err_console, load_recipe, model_option, show

COMMAND = "validate"
ORDER = 20

ModelCheckOpt = model_option(
    "the recipe's `model`, else none: the recipe is checked alone",
    purpose="Also check layer/head indices against this model's config (no weights loaded). ",
)


def run(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file or built-in recipe name.")],
    model: ModelCheckOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Validate a recipe: fields, types, ranges, and (with --model or the recipe's `model`) its layers and heads.

    Every problem is reported at once, those of the fields and those against the model together;
    what is valid but likely not meant (no interventions, a step still to run) is a warning."""
    from attnedit.modelinfo import ModelInfo  # noqa: PLC0415
    from attnedit.recipe import model_problems  # noqa: PLC0415

    try:
        rec, invalid = load_recipe(recipe), None
    except RecipeError as e:
        if not hasattr(e, "valid"):
            raise
        rec, invalid = None, e
    info = None
    name = model or (rec.model if rec is not None else invalid.model)
    if name:
        from attnedit.loading import load_config  # noqa: PLC0415  (transformers: only with a model)

        try:
            info = ModelInfo.from_config(load_config(name, cache_dir), name=name)
        except AttneditError as e:
            if invalid is None:
                raise
            raise RecipeError([*invalid.problems, f"model {name}: {e}"], invalid.source) from None
    if invalid is not None:
        extra = model_problems(invalid.valid, info, invalid.lines, invalid.source) if info is not None else []
        raise RecipeError(invalid.problems + extra, invalid.source)
    if info is not None:
        rec.check_model(info)
    for warning in rec.warnings():
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    table = Table(title=f"{rec.source}: {len(rec)} intervention(s), valid" + (f" for {info.name}" if info else ""))
    for col in ("#", "type", "where", "parameters"):
        table.add_column(col, overflow="fold")
    for i, spec in enumerate(rec.interventions):
        params = {k: v for k, v in spec.model_dump().items() if k not in ("type", "layers", "heads")}
        if info is not None:
            targets = spec.targets(info)
            where = f"{len(targets)} layers, {sum(len(h) for h in targets.values())} heads"
        else:
            where = f"layers={spec.layers} heads={spec.heads}"
        table.add_row(str(i), spec.type, where, ", ".join(f"{k}={v}" for k, v in params.items()))
    show(table)
