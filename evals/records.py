"""Per-example records and task metrics: what `score` returns and `metric` summarises.

A record is a plain dict (it goes to ``samples_<task>.jsonl`` as is)::

    {"id": "stsa.binary.test:7", "pred": 1, "prediction": "positive", "scores": [-2.1, -0.4],
     "gold": [1], "correct": true}

Generation records have the generated text as `prediction` and `targets` instead of scores.
"""

from __future__ import annotations

from typing import Sequence

from attnedit import progress

from .prompts import Encoded, encode
from .scoring import choice_scores, generate, generation_correct, normalise_scores, patched, plan_batches
from .stats import macro_f1
from .task import Example, Task
from .vision import image_text, pope_scores


def score(
    model,
    tokenizer,
    task: Task,
    examples: Sequence[Example],
    *,
    shots: int = 0,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    chat: bool | None = None,
    encoded: Sequence[Encoded] | None = None,
    recipe=None,
    backend: str | None = None,
) -> list[dict]:
    """Score examples with a model, optionally patched with a recipe.

    Args:
        model, tokenizer: a loaded model and its tokenizer (or processor, for vision-language tasks).
        task: the task the examples come from.
        examples: the examples to score, e.g. ``task.split("train")[:300]``.
        shots, seed, chat: demonstrations per example, their seed, chat prompts (see `encode`).
        batch_size: rows per forward (left padded; scores do not depend on it).
        progress: show a progress bar on stderr.
        encoded: the examples already encoded with `encode` (reuse them across recipes).
        recipe: a `Recipe`, a recipe path or a ready `Patch` to apply while scoring; None: unpatched.
        backend: kernel backend for the patch ("auto", "reference", "triton").
    Returns:
        One record per example, in order (see the module docstring).
    """
    items = (
        list(encoded)
        if encoded is not None
        else encode_for(task, examples, tokenizer, shots=shots, seed=seed, chat=chat)
    )
    out: list[dict] = [{} for _ in items]
    with patched(model, recipe, backend), _bar(progress, len(items), task.name) as advance:
        for batch in plan_batches(items, batch_size):
            for i, rec in zip(
                batch, score_batch(model, tokenizer, task, examples, [items[i] for i in batch], batch_size)
            ):
                out[i] = rec
            advance(len(batch))
    return out


def encode_for(task: Task, examples, tokenizer, **kw) -> list[Encoded]:
    """`encode`, with the processor's image token for vision-language tasks."""
    if task.kind == "pope":
        kw["image_text"] = image_text(tokenizer)
    return encode(task, examples, tokenizer, **kw)


def score_batch(
    model, tokenizer, task: Task, examples: Sequence[Example], items: Sequence[Encoded], chunk: int = 8
) -> list[dict]:
    """Records of one batch of encoded examples (`examples[item.index]` is each item's example)."""
    spec = task.spec
    exs = [examples[it.index] for it in items]
    if spec.kind == "generation":
        outputs = generate(model, tokenizer, items, spec)
        how = spec.metric or "exact_match"
        return [
            {
                "id": ex.id,
                "prediction": o,
                "targets": list(ex.targets),
                "correct": generation_correct(o, ex.targets, how),
            }
            for ex, o in zip(exs, outputs)
        ]
    if spec.kind == "pope":
        raw, lengths = pope_scores(model, tokenizer, items)
    else:
        tok = getattr(tokenizer, "tokenizer", tokenizer)
        raw, lengths = choice_scores(model, items, tok.pad_token_id, chunk=chunk)
    return [choice_record(ex, r, n, spec.normalize) for ex, r, n in zip(exs, raw, lengths)]


def choice_record(ex: Example, raw: list[float], lengths: list[int], normalize: str = "none") -> dict:
    scores = normalise_scores(raw, lengths, ex.choices, normalize)
    pred = max(range(len(scores)), key=lambda j: (scores[j], -j))  # the first of equal maxima
    return {
        "id": ex.id,
        "pred": pred,
        "prediction": ex.choices[pred],
        "scores": scores,
        "gold": list(ex.gold),
        "correct": pred in ex.gold,
    }


def metric(records: Sequence[dict], task: Task | None = None) -> dict[str, float]:
    """Summary metrics of records: always `accuracy` and `n`; more by task kind.

    classification: `macro_f1`; pope: `macro_f1`, `precision`, `recall`, `f1` (of "yes"), `yes_ratio`;
    knowledge_conflict: `context_rate`, `memory_rate` (how often the context's / the memory's answer wins);
    generation: `exact_match` or `contains` (the task's metric). With `task`, `value` is its primary metric.
    """
    n = len(records)
    out: dict[str, float] = {"n": n, "accuracy": sum(bool(r["correct"]) for r in records) / n if n else float("nan")}
    kind = task.kind if task is not None else None
    if kind in ("classification", "pope") and n:
        gold = [r["gold"][0] for r in records]
        pred = [r["pred"] for r in records]
        out["macro_f1"] = macro_f1(gold, pred, len(task.labels))
    if kind == "pope" and n:
        out.update(_pope(records, task.labels.index("yes")))
    if kind == "knowledge_conflict" and n:
        out["context_rate"] = sum(r["pred"] == 0 for r in records) / n
        out["memory_rate"] = sum(r["pred"] == 1 for r in records) / n
    if kind == "generation":
        out[task.metric] = out["accuracy"]
    if task is not None:
        out["value"] = out.get(task.metric, out["accuracy"])
    return out


def per_example(records: Sequence[dict], name: str) -> list[float]:
    """The per-example values whose mean is metric `name` (for paired tests): 1.0 or 0.0 each."""
    if name == "context_rate":
        return [float(r["pred"] == 0) for r in records]
    if name == "memory_rate":
        return [float(r["pred"] == 1) for r in records]
    return [float(bool(r["correct"])) for r in records]


def _pope(records: Sequence[dict], yes: int) -> dict[str, float]:
    tp = sum(r["pred"] == yes and yes in r["gold"] for r in records)
    fp = sum(r["pred"] == yes and yes not in r["gold"] for r in records)
    fn = sum(r["pred"] != yes and yes in r["gold"] for r in records)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(r["pred"] == yes for r in records) / len(records),
    }


def _bar(show: bool, total: int, label: str):
    return progress.bar(show, total, f"scoring {label}")
