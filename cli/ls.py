"""attnedit ls: the built-in recipes, or the intervention methods and what each can do."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from .common import builtin_recipes, show

COMMAND = "ls"
ORDER = 10


def run(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list instead of a table.")] = False,
    methods: Annotated[
        bool,
        typer.Option(
            "--methods", help="List the intervention methods instead: effects, search, --param options, export."
        ),
    ] = False,
) -> None:
    """List the built-in recipes with a one-line description (copy one with `attnedit cp NAME PATH`)."""
    import json  # noqa: PLC0415

    from attnedit.recipe import Recipe  # noqa: PLC0415

    if methods:
        rows = _methods()
        title = "intervention methods (a recipe's `type:`)"
    else:
        rows = []
        for name, path in builtin_recipes().items():
            recipe = Recipe.from_yaml(path)
            used = ", ".join(dict.fromkeys(spec.type for spec in recipe.interventions))
            rows.append(
                {"name": name, "methods": used, "model": recipe.model or "", "description": recipe.description or ""}
            )
        title = "built-in recipes"
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=title)
    for col in rows[0] if rows else ("name",):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(", ".join(v) if isinstance(v, list) else str(v) for v in row.values()))
    show(table)


def _methods() -> list[dict]:
    """One row per registered method, from its declaration."""
    from attnedit.interventions import registry  # noqa: PLC0415

    rows = []
    for m in registry.methods():
        s = m.search
        if s is None:
            search = "none: targets are given" + (" or chosen per input" if m.per_input else "")
        else:
            where = f"task: {', '.join(s.task_kinds)}" if s.needs_task else "no task: reads the model"
            search = f"{s.about} ({where})"
        params = [
            f"{p.name}: {p.allowed()}" + ("" if p.default is None else f" (default {_show(p.default)})")
            for p in (s.params if s else ())
        ]
        rows.append(
            {
                "name": m.name,
                "summary": m.summary,
                "effects": [k.__name__ for k in m.emits],
                "search": search,
                "params": params,
                "per input": "yes" if m.per_input else "no",
                "export": f"folds: {m.fold}" if m.fold else "stays dynamic",
            }
        )
    return rows


def _show(value) -> str:
    return (
        ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        if isinstance(value, (list, tuple))
        else str(value)
    )
