"""User-facing errors.

Every error a user can cause by what they typed or wrote derives from
`AttneditError`. The CLI prints these as one clear message and exits non-zero;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class AttneditError(Exception):
    """A problem with the user's input, explained in the message."""


class RecipeError(AttneditError):
    """A recipe that does not parse or does not validate.

    Attributes:
        problems: one line per problem: ``file:line: field.path: what is wrong (what is allowed)``.
    """

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        head = f"invalid recipe {source}" if source else "invalid recipe"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in self.problems))


class ModelLoadError(AttneditError):
    """A model that cannot be found, verified or loaded."""


class BackendError(AttneditError):
    """A forced kernel backend that cannot run on the given tensors."""


class UnsupportedModelError(AttneditError):
    """A model whose attention attnedit cannot patch, or that lacks what a method needs."""
