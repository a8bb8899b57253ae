"""Export fixtures: an isolated transformers modules cache, throwaway intervention methods."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the tests here import export_kit


@pytest.fixture
def hf_modules(tmp_path, monkeypatch):
    """transformers copies trust_remote_code modules into its modules cache: keep that inside the test."""
    from transformers import dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


@pytest.fixture
def method(monkeypatch):
    """Register a throwaway intervention method for one test: method(name, schema, compile, **declaration)."""
    from attnedit.interventions import registry
    from attnedit.tables import EFFECT_KINDS

    def add(name, schema, fn, **declared):
        declared.setdefault("emits", EFFECT_KINDS)
        monkeypatch.setitem(
            registry._METHODS, name, registry.Method(name, schema, fn, f"test method {name}", **declared)
        )

    return add
