"""Eval fixtures: a tiny model over a word-level tokenizer, toy task files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the tests here import evalkit

import evalkit  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Llama and a word-level tokenizer that covers the toy task and the fact table."""
    return evalkit.tiny_lm()


@pytest.fixture
def toy(tmp_path):
    """The toy classification task file (20 test, 24 train rows)."""
    return evalkit.toy_task(tmp_path / "toy")
