"""What searches share: the calibration context, the candidate loop, the resolved recipe.

A method's search (`registry.Search.find`) gets the spec to resolve and a
`Calibration` and returns a `Found`. It never reads a data set itself: it calls
``cal.score(recipe)`` (higher is better, on the calibration examples only) or
reads ``cal.examples`` when its statistic needs the inputs (PH3's conflicts,
given by `Search.reads`; mean ablation). So searches run the same on a real
task and on a tiny synthetic scorer in tests.
"""

from __future__ import annotations

import datetime as _dt
import math
import random
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from attnedit import evals
from attnedit.errors import AttneditError
from attnedit.evals.records import choice_record
from attnedit.evals.scoring import left_pad, plan_batches
from attnedit.recipe import InterventionSpec, Recipe
from attnedit.version import __version__

from . import registry
from .replay import Replay, first_layer


@dataclass
class Calibration:
    """The context of one target search.

    Attributes:
        model, tokenizer, info: the loaded model, its tokenizer (or processor) and `ModelInfo`.
        score: ``score(recipe or None) -> float`` on the calibration examples; None = unpatched model.
        examples: the calibration examples, for finders whose statistic needs inputs.
        prompts: the examples' prompt texts as the model sees them (a reference set for means).
        objective: what `score` measures (e.g. "accuracy", "-entropy"), for provenance.
        max_candidates: stop after scoring this many candidates (None: all).
        seed: the seed of every random choice.
        task: the calibration task (an `attnedit.evals.Task`), or None for searches that need none.
        progress: ``progress(total, description) -> callable(advance=1)``; default: no display.
        options: method-specific options from the command line (e.g. ``{"k": 5}``).
        scorer_for: ``scorer_for(examples) -> score`` on other examples of the same task, objective and
            prompts (a search that screens candidates on a part of `examples` uses it); None: not offered.
    """

    model: Any
    tokenizer: Any
    info: Any
    score: Callable[[Recipe | None], float] | None = None
    examples: Sequence[Any] = ()
    prompts: Sequence[str] = ()
    objective: str = "accuracy"
    max_candidates: int | None = None
    seed: int = 0
    task: Any = None
    progress: Callable[[int, str], Callable[..., None]] | None = None
    options: dict = field(default_factory=dict)
    scorer_for: Callable[[Sequence[Any]], Callable[[Recipe | None], float]] | None = None


@dataclass
class Found:
    """What a finder returns.

    Attributes:
        specs: the resolved interventions (usually one) that replace the searched spec.
        candidates: one record per scored candidate: ``{"candidate": {...}, "score": float}``.
        chosen: the chosen candidate's record (or a summary for statistics-based finders).
        baseline: the unpatched score, when the search has one.
        notes: method-specific details for the provenance.
        score: the score of `specs` on the calibration examples, by the search's own objective
            (the baseline when `specs` is empty); None: `calibrate` measures it with ``cal.score``.
    """

    specs: list[InterventionSpec]
    candidates: list[dict] = field(default_factory=list)
    chosen: dict | None = None
    baseline: float | None = None
    notes: dict = field(default_factory=dict)
    score: float | None = None


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


def provenance(**fields) -> dict:
    """The provenance block of a calibrated recipe: the given fields, plus tool version and date, as plain data."""
    out = {"tool": f"attnedit {__version__}", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    out.update(fields)
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


# --------------------------------------------------------------------------- the calibrate command's engine

MIN_EXAMPLES = 16
# Task kinds whose examples `task_scorer` scores candidates on (a search declares them in `Search.scores_on`).
SCORED_TASKS = ("classification", "multiple_choice", "generation", "pope")


DEFAULT_HOLDOUT = 0.2


def calibration_examples(task, limit: int | None, seed: int, minimum: int = MIN_EXAMPLES) -> list:
    """A seeded sample of `limit` examples of the task's train split (never its test split).

    Raises:
        AttneditError: the split (or the limit) leaves fewer than `minimum` examples.
    """
    pool = list(task.split("train"))
    if len(pool) < minimum:
        raise AttneditError(f"task {task.name!r} has {len(pool)} train examples; calibration needs at least {minimum}")
    chosen = random.Random(seed).sample(pool, min(len(pool), limit)) if limit is not None else pool
    if len(chosen) < minimum:
        raise AttneditError(
            f"--limit {limit} leaves {len(chosen)} calibration examples; calibration needs at least {minimum}"
        )
    return chosen


def split_holdout(examples: Sequence, fraction: float, seed: int, minimum: int = MIN_EXAMPLES) -> tuple[list, list]:
    """(search examples, held-out examples): a seeded `fraction` of `examples` kept out of the search.

    The held-out part is ``round(fraction * n)`` examples (none when `fraction` is 0), drawn with a
    generator of its own so that the search examples do not depend on anything else.

    Raises:
        AttneditError: the fraction is outside [0, 1), or leaves fewer than `minimum` search examples.
    """
    if not 0 <= fraction < 1:
        raise AttneditError(f"--holdout {fraction}: the held-out fraction must be in [0, 1)")
    n_held = round(fraction * len(examples))
    if n_held == 0:
        return list(examples), []
    if len(examples) - n_held < minimum:
        raise AttneditError(
            f"--holdout {fraction} of {len(examples)} examples leaves {len(examples) - n_held} for the search; "
            f"calibration needs at least {minimum} (raise --limit, or --holdout 0 to keep none out)"
        )
    held = set(random.Random(f"holdout:{seed}").sample(range(len(examples)), n_held))
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def task_scorer(
    model, tokenizer, task, examples, *, objective: str, shots: int, seed: int, batch_size: int, backend: str | None
):
    """``score(recipe or None) -> float`` on fixed examples, by `objective`:

    accuracy: the task's primary metric (the papers' criterion); logprob: the mean log-probability of
    the gold answer among the choices (labelled, less noisy on few examples); entropy: minus the mean
    entropy of the answer distribution (unsupervised: labels unused).

    Scores equal `attnedit.evals.score`'s. With one-token answers, candidates that edit only later
    layers rerun only those (`replay.Replay`).
    """
    encoded = evals.encode(task, examples, tokenizer, shots=shots, seed=seed)  # tokenized once for every candidate
    prompts = [it.prompt for it in encoded]
    fast = _fast_records(model, tokenizer, task, examples, encoded, batch_size, backend)

    def records(recipe):
        recs = fast(recipe) if fast is not None else None
        if recs is None:
            recs = evals.score(
                model,
                tokenizer,
                task,
                examples,
                encoded=encoded,
                recipe=recipe,
                backend=backend,
                batch_size=batch_size,
                progress=False,
            )
        return recs

    def score(recipe) -> float:
        return objective_value(records(recipe), objective, task)

    score.records = records  # the per-example records behind a score
    score.prompts = prompts
    return score


def objective_value(recs: Sequence[dict], objective: str, task) -> float:
    """The calibration objective of scored records (see `task_scorer`)."""
    if objective == "entropy":
        return -sum(_entropy(r["scores"]) for r in recs) / len(recs)
    if objective == "logprob":
        return sum(_log_softmax(r["scores"])[r["gold"][0]] for r in recs) / len(recs)
    return float(evals.metric(recs, task)["value"])


def heldout_check(score, recipe: Recipe, objective: str, task) -> dict:
    """The unpatched model and `recipe` on held-out examples: the objective, and the task's metric.

    Args:
        score: a `task_scorer` over the held-out examples.
    """
    base = score.records(None)
    edit = score.records(recipe) if recipe.interventions else base
    out = {
        "n": len(base),
        "objective": objective,
        "baseline": objective_value(base, objective, task),
        "calibrated": objective_value(edit, objective, task),
    }
    if objective != "accuracy" and task.kind != "generation" and all(r.get("gold") for r in base):
        out["metric"] = task.metric
        out["metric_baseline"] = float(evals.metric(base, task)["value"])
        out["metric_calibrated"] = float(evals.metric(edit, task)["value"])
    return out


def _fast_records(model, tokenizer, task, examples, encoded, batch_size, backend):
    """A records function through `Replay`, or None when answers are not single tokens or the cache is too big."""
    if task.kind == "generation" or any(len(c) != 1 for it in encoded for c in it.choice_ids):
        return None
    if not Replay.fits(model, sum(len(it.prompt_ids) for it in encoded)):
        return None
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    device = next(model.parameters()).device
    from attnedit.patch import Patch  # noqa: PLC0415  (attnedit.patch loads torch and transformers; recipes are read without them)

    plan = plan_batches(encoded, batch_size)
    replay = Replay(model, [left_pad([encoded[i].prompt_ids for i in b], tok.pad_token_id, device) for b in plan])

    def records(recipe):
        if recipe is None:
            logits = replay.last_logits(0)
        else:
            patch = Patch(model, recipe, backend=backend)
            start = first_layer(patch.compiled)
            if start is None:
                return None
            with patch:
                logits = replay.last_logits(start, patch)
        out = [None] * len(encoded)
        for b, rows in zip(plan, logits):
            logp = rows.log_softmax(-1)
            for r, i in enumerate(b):
                item = encoded[i]
                raw = [float(logp[r, c[0]]) for c in item.choice_ids]
                out[i] = choice_record(examples[item.index], raw, [1] * len(raw), task.spec.normalize)
        return out

    return records


def _entropy(scores) -> float:
    logp = _log_softmax(scores)
    return -sum(math.exp(v) * v for v in logp)


def _log_softmax(scores) -> list[float]:
    top = max(scores)
    z = math.log(sum(math.exp(s - top) for s in scores)) + top
    return [s - z for s in scores]


def calibrate(recipe: Recipe, cal: Calibration) -> tuple[Recipe, list[dict]]:
    """Run the search of every intervention whose method has one; keep the others as they are.

    A search that reads the task's examples itself (`Search.reads`, for the task's kind) gets them
    turned into its own inputs (PH3: conflict prompts); the others score on ``cal.score``.

    Returns:
        (the resolved recipe, one search summary per intervention).
    """
    specs, searches = [], []
    unpatched: list[float] = []  # the unpatched score, measured at most once

    def baseline_score() -> float:
        if not unpatched:
            unpatched.append(float(cal.score(None)))
        return unpatched[0]

    for i, spec in enumerate(recipe.interventions):
        method = registry.get(spec.type)
        if method.search is None:
            specs.append(spec)
            searches.append(
                {
                    "index": i,
                    "method": spec.type,
                    "searched": False,
                    "why": "no search (targets are given or found per input)",
                }
            )
            continue
        reads = method.search.reads.get(cal.task.kind) if cal.task is not None else None
        here = cal if reads is None else replace(cal, examples=reads(cal.task, cal.examples, cal.tokenizer))
        found = method.search.find(spec, here)
        kept, why = _guard(found, here, baseline_score)
        specs.extend(kept)
        searches.append(
            {
                "index": i,
                "method": spec.type,
                "searched": True,
                "baseline": found.baseline,
                "score": found.score,
                "chosen": found.chosen if kept else None,
                "kept_interventions": len(kept),
                **({"why": why} if why else {}),
                "notes": found.notes,
                "candidates": found.candidates,
            }
        )
    resolved = recipe.replace(interventions=tuple(specs))
    if cal.score is not None and len(specs) > 1 and any(s["searched"] for s in searches):
        whole, base = float(cal.score(resolved)), baseline_score()
        if whole < base:  # each part passed alone, together they hurt: write nothing rather than harm
            why = f"the interventions together score {whole:.4f} < {base:.4f} unpatched on the calibration examples"
            searches.append({"index": None, "method": "all", "searched": True, "kept_interventions": 0, "why": why})
            resolved = recipe.replace(interventions=())
    return resolved, searches


def _guard(found: Found, cal: Calibration, baseline_score) -> tuple[list[InterventionSpec], str | None]:
    """The specs a search may write: none when they score below the unpatched model (and why)."""
    if not found.specs:
        return [], "no candidate beat the unpatched model"
    if found.score is None or found.baseline is None:
        if cal.score is None:  # nothing to judge by (statistics-only search without a task scorer)
            return list(found.specs), None
        found.baseline = baseline_score() if found.baseline is None else found.baseline
        found.score = float(cal.score(recipe_of(*found.specs)))
    if found.score < found.baseline:
        return [], (
            f"the recipe found scores {found.score:.4f} < {found.baseline:.4f} unpatched on the calibration "
            "examples: nothing written rather than a recipe that hurts"
        )
    return list(found.specs), None
