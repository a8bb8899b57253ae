"""attnedit ls: the built-in recipes."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from .common import builtin_recipes, console

COMMAND = "ls"
ORDER = 10


def run(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
) -> None:
    """List the built-in recipes with a one-line description (copy one with `attnedit cp NAME PATH`)."""
    import json  # noqa: PLC0415

    from attnedit.recipe import Recipe  # noqa: PLC0415

    rows = []
    for name, path in builtin_recipes().items():
        recipe = Recipe.from_yaml(path)
        methods = ", ".join(dict.fromkeys(spec.type for spec in recipe.interventions))
        rows.append(
            {"name": name, "methods": methods, "model": recipe.model or "", "description": recipe.description or ""}
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="built-in recipes")
    for col in ("name", "methods", "model", "description"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row.values())
    console.print(table)
