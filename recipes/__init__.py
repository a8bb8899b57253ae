"""The built-in recipes: the YAML files of this folder, each named by its file name."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from attnedit.errors import AttneditError
from attnedit.recipe import Recipe


def builtin_recipes() -> dict[str, Path]:
    """Built-in recipe names -> files (the YAML files shipped in attnedit.recipes), sorted by name."""
    root = resources.files(__name__)
    out = {}
    for entry in root.iterdir():
        if entry.name.endswith(".yaml"):
            out[entry.name[: -len(".yaml")]] = Path(str(entry))
    return dict(sorted(out.items()))


def recipe_path(arg: str) -> Path:
    """A recipe argument: a YAML path, or the name of a built-in recipe.

    Raises:
        AttneditError: neither a file nor a built-in name (the message lists the built-ins).
    """
    path = Path(arg)
    if path.is_file():
        return path
    builtins = builtin_recipes()
    if arg in builtins:
        return builtins[arg]
    if path.suffix in (".yaml", ".yml") or os.sep in arg:
        raise AttneditError(f"recipe file {arg} does not exist")
    raise AttneditError(f"{arg!r} is neither a recipe file nor a built-in recipe; built-ins: {', '.join(builtins)}")


def load_recipe(arg: str) -> Recipe:
    """The recipe of a YAML path or a built-in recipe name."""
    return Recipe.from_yaml(recipe_path(arg))
