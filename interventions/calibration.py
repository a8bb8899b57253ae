"""What target finders share: the calibration context, the candidate loop, the resolved recipe.

A finder (`registry.finder(name)`) gets the spec to resolve and a `Calibration`
and returns a `Found`. It never reads a data set itself: it calls
``cal.score(recipe)`` (higher is better, on the calibration examples only) or
reads ``cal.examples`` when its statistic needs the inputs (PH3's conflicts,
mean ablation). So finders run the same on a real task and on a tiny synthetic
scorer in tests.
"""
from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from attnedit.errors import AttneditError
from attnedit.recipe import InterventionSpec, Recipe


@dataclass
class Calibration:
    """The context of one target search.

    Attributes:
        model, tokenizer, info: the loaded model, its tokenizer (or processor) and `ModelInfo`.
        score: ``score(recipe or None) -> float`` on the calibration examples; None = unpatched model.
        examples: the calibration examples, for finders whose statistic needs inputs.
        objective: what `score` measures (e.g. "accuracy", "-entropy"), for provenance.
        max_candidates: stop after scoring this many candidates (None: all).
        seed: the seed of every random choice.
        progress: ``progress(total, description) -> callable(advance=1)``; default: no display.
        options: method-specific options from the command line (e.g. ``{"k": 5}``).
    """

    model: Any
    tokenizer: Any
    info: Any
    score: Callable[[Recipe | None], float] | None = None
    examples: Sequence[Any] = ()
    objective: str = "accuracy"
    max_candidates: int | None = None
    seed: int = 0
    progress: Callable[[int, str], Callable[..., None]] | None = None
    options: dict = field(default_factory=dict)


@dataclass
class Found:
    """What a finder returns.

    Attributes:
        specs: the resolved interventions (usually one) that replace the searched spec.
        candidates: one record per scored candidate: ``{"candidate": {...}, "score": float}``.
        chosen: the chosen candidate's record (or a summary for statistics-based finders).
        baseline: the unpatched score, when the search has one.
        notes: method-specific details for the provenance.
    """

    specs: list[InterventionSpec]
    candidates: list[dict] = field(default_factory=list)
    chosen: dict | None = None
    baseline: float | None = None
    notes: dict = field(default_factory=dict)


def recipe_of(*specs: InterventionSpec) -> Recipe:
    """A recipe holding just these interventions (what one candidate runs)."""
    return Recipe(interventions=tuple(specs))


def need_scorer(cal: Calibration, method: str) -> Callable[[Recipe | None], float]:
    if cal.score is None:
        raise AttneditError(f"calibrating {method} needs a task to score candidates on (--task)")
    return cal.score


def score_all(cal: Calibration, candidates: Sequence[tuple[dict, Recipe]], label: str) -> list[dict]:
    """Score candidates in order, at most `cal.max_candidates`, with progress.

    Args:
        cal: the calibration context (its scorer must be set).
        candidates: (description, recipe) pairs.
        label: what the progress display says.
    Returns:
        ``[{"candidate": description, "score": float}, ...]`` for the candidates scored.
    """
    score = need_scorer(cal, label)
    todo = list(candidates)
    if cal.max_candidates is not None:
        todo = todo[: max(0, cal.max_candidates)]
    step = cal.progress(len(todo), label) if cal.progress else (lambda **_: None)
    out = []
    for desc, recipe in todo:
        value = float(score(recipe))
        out.append({"candidate": desc, "score": value})
        step(advance=1)
    return out


def best(records: Sequence[dict], baseline: float | None = None) -> dict | None:
    """The highest-scoring record (the first one on ties: candidates come simplest first).

    Returns None when there is none or none beats `baseline`.
    """
    top = None
    for r in records:
        if math.isnan(r["score"]):
            continue
        if top is None or r["score"] > top["score"]:
            top = r
    if top is None or (baseline is not None and top["score"] <= baseline):
        return None
    return top


def provenance(
    *,
    model_name: str,
    model_hash: str,
    task: str | None,
    split: str | None,
    n: int,
    seed: int,
    objective: str,
    method: str,
    found: Found,
    budget: dict,
    elapsed_s: float,
    extra: dict | None = None,
) -> dict:
    """The provenance block written into a calibrated recipe (plain data: YAML/JSON-safe)."""
    from attnedit import __version__  # noqa: PLC0415

    out = {
        "tool": f"attnedit {__version__}",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "method": method,
        "model": model_name,
        "model_hash": model_hash,
        "task": task,
        "split": split,
        "n_examples": n,
        "seed": seed,
        "objective": objective,
        "budget": budget,
        "elapsed_s": round(elapsed_s, 1),
        "baseline": found.baseline,
        "chosen": found.chosen,
        "candidates": found.candidates,
    }
    if found.notes:
        out["notes"] = found.notes
    if extra:
        out.update(extra)
    return _plain(out)


def _plain(obj):
    if isinstance(obj, dict):
        return {(k if isinstance(k, (int, str)) else str(k)): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float):
        return round(obj, 6) if math.isfinite(obj) else str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return _plain(obj.item())
    return obj
