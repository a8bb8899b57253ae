"""attnedit: training-free attention interventions for Hugging Face checkpoints.

import attnedit
model, tokenizer = attnedit.load("smollm2-135m-instruct")
recipe = attnedit.Recipe.from_yaml("recipe.yaml")
with attnedit.patch(model, recipe):
    out = model(**batch)
"""

import sys
import types
from importlib import import_module

from .errors import AttneditError, BackendError, ModelLoadError, RecipeError, UnsupportedModelError
from .interventions import builtin as _builtin  # noqa: F401  (importing it registers the built-in methods)
from .version import __version__

# The rest imports torch and transformers (seconds): loaded on first use, so that `attnedit --help`,
# `ls`, `cp` and `validate` start fast.
_LAZY = {"export": "export", "load": "loading", "Patch": "patch", "patch": "patch", "Recipe": "recipe"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attnedit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """`attnedit.export` and `attnedit.patch` are functions, though submodules of the same names exist:
    when one of those submodules is imported, the package keeps its function under the name."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and name in _LAZY and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


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
