"""The method registry: a recipe picks a method by its `type:`, never by an import path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from attnedit.errors import RecipeError


@dataclass
class Method:
    """One intervention method.

    Attributes:
        name: the recipe's `type:`.
        schema: its pydantic schema (a subclass of `attnedit.recipe.InterventionSpec`).
        compile: ``compile(spec, info, model) -> list of effects`` (see `attnedit.tables`).
        summary: one line for `attnedit ls` and docs.
        needs_spans: the method reads highlighted spans given with the input (PASTA).
        find: the target finder used by `attnedit calibrate`, or None.
    """

    name: str
    schema: type
    compile: Callable[..., list]
    summary: str
    needs_spans: bool = False
    find: Callable[..., Any] | None = None


_METHODS: dict[str, Method] = {}


def register(name: str, *, schema: type, summary: str, needs_spans: bool = False):
    """Decorator for a method's compile function. Refuses a name registered twice."""

    def deco(fn: Callable[..., list]) -> Callable[..., list]:
        if name in _METHODS:
            raise ValueError(f"intervention type {name!r} is registered twice")
        _METHODS[name] = Method(name, schema, fn, summary, needs_spans)
        return fn

    return deco


def finder(name: str):
    """Decorator that attaches a target finder to a registered method."""

    def deco(fn):
        get(name).find = fn
        return fn

    return deco


def get(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise RecipeError([f"unknown intervention type {name!r}; allowed: {', '.join(names())}"]) from None


def names() -> list[str]:
    return sorted(_METHODS)
