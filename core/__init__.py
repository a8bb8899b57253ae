"""attnedit: training-free attention interventions for Hugging Face checkpoints.

import attnedit
model, tokenizer = attnedit.load("smollm2-135m-instruct")
recipe = attnedit.Recipe.from_yaml("recipe.yaml")
with attnedit.patch(model, recipe):
    out = model(**batch)
"""

from .errors import AttneditError, BackendError, ModelLoadError, RecipeError, UnsupportedModelError
from .export import export
from .interventions import builtin as _builtin  # noqa: F401  (importing it registers the built-in methods)
from .loading import load
from .patch import Patch, patch
from .recipe import Recipe
from .version import __version__

__all__ = [
    "AttneditError",
    "BackendError",
    "ModelLoadError",
    "Patch",
    "Recipe",
    "RecipeError",
    "UnsupportedModelError",
    "export",
    "load",
    "patch",
    "__version__",
]
