"""attnedit cp: copy a built-in recipe to edit it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import UsageError, builtin_recipes, check_writable, console, write_atomic

COMMAND = "cp"
ORDER = 11


def run(
    name: Annotated[str, typer.Argument(help="A built-in recipe (see `attnedit ls`).")],
    path: Annotated[Path, typer.Argument(help="Where to write the copy (a file, or an existing folder).")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Copy a built-in recipe to PATH so you can edit it."""
    builtins = builtin_recipes()
    if name not in builtins:
        raise UsageError(f"no built-in recipe {name!r}; built-ins: {', '.join(builtins)}")
    if path.is_dir():
        path = path / f"{name}.yaml"
    check_writable(path, force, "PATH")
    write_atomic(path, builtins[name].read_text(encoding="utf-8"))
    console.print(f"wrote {path}")
