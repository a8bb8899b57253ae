"""torch and numpy, imported on their first use rather than when a module that uses them is imported.

`from attnedit.lazy import torch` gives an object that stands for the torch module: the first
attribute read (``torch.zeros``, ``torch.Tensor``) imports torch, and every read after it is the
module's own attribute. The modules that define recipe schemas and effect kinds use it, so that
reading and checking a recipe (`attnedit validate`, `ls`, `cp`, `--help`) does not spend seconds
importing torch. Annotations are strings (``from __future__ import annotations``) and never read it.
"""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Any, Callable


class _LazyModule:
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        module = sys.modules.get(self._name) or importlib.import_module(self._name)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


torch: Any = _LazyModule("torch")
np: Any = _LazyModule("numpy")


def no_grad(fn: Callable) -> Callable:
    """``@torch.no_grad()`` for a function, without importing torch where the function is defined."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper
