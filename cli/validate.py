"""attnedit validate: check a recipe, optionally against a model's config (no weights loaded)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from .common import CacheOpt, console, load_recipe

COMMAND = "validate"
ORDER = 20


def run(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file or built-in recipe name.")],
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Also check layer/head indices against this model's config.")
    ] = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Validate a recipe: fields, types, ranges, and (with --model) the model's layers and heads."""
    from attnedit.loading import load_config  # noqa: PLC0415
    from attnedit.modelinfo import ModelInfo  # noqa: PLC0415

    rec = load_recipe(recipe)
    info = None
    name = model or rec.model
    if name:
        info = ModelInfo.from_config(load_config(name, cache_dir), name=name)
        rec.check_model(info)
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
    console.print(table)
