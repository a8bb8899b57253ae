"""Every YAML in recipes/ validates, opens with the command that runs it, and fits the default model's shape."""

from __future__ import annotations

from pathlib import Path

import pytest

import attnedit
from attnedit.modelinfo import ModelInfo

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
# SmolLM2-135M-Instruct's shape, from its config (no weights needed)
SMOLLM2 = ModelInfo(
    "smollm2-135m-instruct", "llama", n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, hidden_size=576
)


def test_there_are_builtin_recipes():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_builtin_recipe(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# attnedit "), f"{path.name} must open with a comment showing the command that runs it"
    recipe = attnedit.Recipe.from_yaml(path)
    assert recipe.description, f"{path.name} needs a one-line description for `attnedit ls`"
    assert recipe.interventions, f"{path.name} is empty: a built-in recipe changes the model"
    vlm = any(spec.type in ("var", "vhr") for spec in recipe.interventions)
    if not vlm and (recipe.model in (None, "smollm2-135m-instruct")):
        recipe.check_model(SMOLLM2)


def test_builtin_recipe_names_are_their_file_names_and_unique():
    names = {path: attnedit.Recipe.from_yaml(path).name for path in RECIPES}
    wrong = [f"{p.name}: name {n!r}" for p, n in names.items() if n != p.stem]
    assert not wrong, "a built-in recipe's `name:` is its file name: " + ", ".join(wrong)
    assert len(set(names.values())) == len(names)
