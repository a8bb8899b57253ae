"""Knowledge-conflict prompts from LAMA facts (PH3's calibration material).

A LAMA fact (subject, relation, object) with a cloze template such as
``[X] was born in [Y] .`` becomes a conflict prompt: a context that states a
counterfactual object, then the cloze to complete::

    Dante was born in Paris. Dante was born in

The memory answer is the fact's object ("Florence"), the context answer the
counterfactual one ("Paris"), drawn from the other objects of the same
relation. Only templates that end with ``[Y]`` (and a final period) are used.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from attnedit.errors import AttneditError

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Conflict:
    """One knowledge-conflict prompt.

    Attributes:
        prompt: context + cloze, ending right before the answer.
        question: the cloze alone (the memory-only prompt).
        memory: the fact's object (what the model should recall).
        context: the counterfactual object the context states.
        relation: the LAMA relation id.
    """

    prompt: str
    question: str
    memory: str
    context: str
    relation: str


def _templates(root: Path) -> dict[str, str]:
    path = root / "relations.jsonl"
    if not path.is_file():
        raise AttneditError(f"{path} does not exist: point --data-dir at the folder holding fewshot/lama")
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        tpl = row["template"].strip()
        if tpl.endswith("[Y] .") and tpl.count("[X]") == 1 and "[Y]" not in tpl[:-5]:
            out[row["relation"]] = tpl[: -len("[Y] .")].rstrip()
    return out


def lama_conflicts(
    data_dir: str | Path,
    split: str = "train",
    relations: list[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Conflict]:
    """Build knowledge-conflict prompts from LAMA facts.

    Args:
        data_dir: the shared data folder (holding ``fewshot/lama``) or the ``lama`` folder itself.
        split: train, dev or test (calibrate on train, report on test).
        relations: relation ids to use (default: every relation whose template ends with [Y]).
        limit: at most this many prompts, drawn evenly across relations (seeded).
        seed: for the counterfactual objects and the draw.
    Returns:
        Conflict prompts, in a seeded order.
    Raises:
        AttneditError: missing files, an unknown split or relation.
    """
    if split not in SPLITS:
        raise AttneditError(f"unknown LAMA split {split!r}; allowed: {', '.join(SPLITS)}")
    root = Path(data_dir)
    root = root if (root / "relations.jsonl").is_file() else root / "fewshot" / "lama"
    templates = _templates(root)
    chosen = relations or sorted(templates)
    unknown = [r for r in chosen if r not in templates]
    if unknown:
        raise AttneditError(f"LAMA relations {unknown} are unknown or have no cloze template ending in [Y]; usable: {', '.join(sorted(templates))}")
    rng = random.Random(seed)
    per_relation = []
    for rel in chosen:
        path = root / rel / f"{split}.jsonl"
        if not path.is_file():
            continue
        facts = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        objects = sorted({f["obj_label"] for f in facts})
        if len(objects) < 2:
            continue
        rows = []
        for f in facts:
            cf = rng.choice([o for o in objects if o != f["obj_label"]])
            question = templates[rel].replace("[X]", f["sub_label"])
            rows.append(Conflict(f"{question} {cf}. {question}", question, f["obj_label"], cf, rel))
        rng.shuffle(rows)
        per_relation.append(rows)
    out = [row for group in _interleave(per_relation) for row in group]
    return out[:limit] if limit is not None else out


def _interleave(groups: list[list[Conflict]]):
    """Round-robin over relations so that a limit keeps every relation."""
    for i in range(max((len(g) for g in groups), default=0)):
        yield [g[i] for g in groups if i < len(g)]
