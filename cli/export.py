"""attnedit export: write a model with a recipe applied as a folder that loads anywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import (
    CacheOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    check_device,
    console,
    err_console,
    load_model,
    load_recipe,
    show,
)

COMMAND = "export"
ORDER = 50


def run(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file or built-in recipe name.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The folder to write (its parent must exist).")],
    model: ModelOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it is a non-empty folder.")] = False,
    results: Annotated[
        Path | None, typer.Option(help="Results JSON from `attnedit eval`, shown in the model card.")
    ] = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest safetensors shard, e.g. 5GB or 500MB.")] = "5GB",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Export MODEL with RECIPE to a folder: static edits folded into the weights, the rest as a recipe.

    The folder holds safetensors weights, config, tokenizer (processor for VLMs), the resolved recipe and a
    model card. `attnedit.load(DIR)` restores every edit; plain transformers loads the folded ones.
    """
    from attnedit.card import read_results  # noqa: PLC0415
    from attnedit.export import Edit, check_target, export  # noqa: PLC0415
    from attnedit.loading import DEFAULT_MODEL, load_config  # noqa: PLC0415
    from attnedit.modelinfo import ModelInfo  # noqa: PLC0415

    check_device(device)
    rec = load_recipe(recipe)
    name = model or rec.model or DEFAULT_MODEL
    check_target(out, force, name, cache_dir)  # before loading weights
    if results is not None:
        read_results(results)  # a bad results file is refused before the model loads
    rec.check_model(ModelInfo.from_config(load_config(name, cache_dir), name=name))
    m, tok = load_model(name, dtype, device, cache_dir)
    with err_console.status(f"writing {out} ..."):
        result = export(
            m,
            rec,
            out,
            tokenizer=tok,
            force=force,
            results=results,
            base_model=name,
            max_shard_size=max_shard_size,
            cache_dir=cache_dir,
        )
    table = Table(title=f"{recipe} exported to {out}")
    for col in Edit.COLUMNS:
        table.add_column(col, overflow="fold")
    for e in result.plan.edits:
        table.add_row(*e.row())
    show(table)
    if result.plan.dynamic:
        console.print(
            f"dynamic edits need attnedit: attnedit.load({str(out)!r}), or from_pretrained(..., "
            f"trust_remote_code=True); "
            "plain transformers loads the folded edits only"
        )
    console.print(f"wrote {out}")
