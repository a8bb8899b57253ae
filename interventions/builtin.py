"""The built-in methods: importing this module imports every module of `attnedit.interventions`.

Each method's module registers itself (`registry.register`) when imported, so a new method is one
new module here and no line anywhere else. The `attnedit` package imports this module.
"""

import importlib
import pkgutil
from pathlib import Path

for _module in sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])):
    if _module != "builtin":
        importlib.import_module(f"{__package__}.{_module}")
