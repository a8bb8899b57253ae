"""Knowledge-conflict examples from fact triples: LAMA files or the project's own small fact table.

A fact (subject, relation, object) with a cloze template such as
``The capital of [X] is [Y] .`` becomes::

    context:  The capital of France is Madrid.      (a counterfactual object of the same relation)
    question: The capital of France is
    choices:  (" Madrid" = the context answer, " Paris" = the memory answer)

With ``context: false`` the context is left out: plain factual recall, scored
on the same two choices (the model should prefer its memory). Relations let a
caller split the facts: find heads on some relations, report on others.
Only templates whose ``[Y]`` comes after ``[X]`` are used (the question must
end right before the object).
"""

from __future__ import annotations

import json
from pathlib import Path

from .sources import Row, need_file, stable_pick
from .spec import LocalSource, TaskError

# relation -> (template, {subject: object}); written for this project, common knowledge only.
FACTS: dict[str, tuple[str, dict[str, str]]] = {
    "capital": (
        "The capital of [X] is [Y] .",
        {
            "France": "Paris",
            "Germany": "Berlin",
            "Italy": "Rome",
            "Spain": "Madrid",
            "Japan": "Tokyo",
            "Russia": "Moscow",
            "China": "Beijing",
            "Egypt": "Cairo",
            "Greece": "Athens",
            "Portugal": "Lisbon",
            "Austria": "Vienna",
            "Ireland": "Dublin",
            "Norway": "Oslo",
            "Sweden": "Stockholm",
            "Finland": "Helsinki",
            "Denmark": "Copenhagen",
            "Poland": "Warsaw",
            "Hungary": "Budapest",
            "Thailand": "Bangkok",
            "Kenya": "Nairobi",
            "Peru": "Lima",
            "Argentina": "Buenos Aires",
            "England": "London",
            "Belgium": "Brussels",
            "Cuba": "Havana",
            "South Korea": "Seoul",
            "Turkey": "Ankara",
            "Canada": "Ottawa",
            "Australia": "Canberra",
            "Iran": "Tehran",
        },
    ),
    "language": (
        "The official language of [X] is [Y] .",
        {
            "France": "French",
            "Germany": "German",
            "Italy": "Italian",
            "Spain": "Spanish",
            "Japan": "Japanese",
            "Russia": "Russian",
            "China": "Chinese",
            "Greece": "Greek",
            "Portugal": "Portuguese",
            "Brazil": "Portuguese",
            "Mexico": "Spanish",
            "Poland": "Polish",
            "Sweden": "Swedish",
            "Finland": "Finnish",
            "Turkey": "Turkish",
            "the Netherlands": "Dutch",
            "Hungary": "Hungarian",
            "Thailand": "Thai",
            "Austria": "German",
            "Argentina": "Spanish",
        },
    ),
    "continent": (
        "[X] is a country in [Y] .",
        {
            "France": "Europe",
            "Germany": "Europe",
            "Italy": "Europe",
            "Norway": "Europe",
            "Poland": "Europe",
            "Japan": "Asia",
            "China": "Asia",
            "India": "Asia",
            "Thailand": "Asia",
            "Vietnam": "Asia",
            "Egypt": "Africa",
            "Kenya": "Africa",
            "Nigeria": "Africa",
            "Ghana": "Africa",
            "Ethiopia": "Africa",
            "Brazil": "South America",
            "Peru": "South America",
            "Chile": "South America",
            "Argentina": "South America",
            "Canada": "North America",
            "Mexico": "North America",
            "Australia": "Oceania",
            "New Zealand": "Oceania",
        },
    ),
    "landmark": (
        "[X] is in the city of [Y] .",
        {
            "The Eiffel Tower": "Paris",
            "The Colosseum": "Rome",
            "Big Ben": "London",
            "The Statue of Liberty": "New York",
            "The Brandenburg Gate": "Berlin",
            "The Kremlin": "Moscow",
            "The Acropolis": "Athens",
            "The Sagrada Familia": "Barcelona",
            "The Golden Gate Bridge": "San Francisco",
            "The Sydney Opera House": "Sydney",
            "The Forbidden City": "Beijing",
            "The Leaning Tower": "Pisa",
            "The Louvre": "Paris",
            "The Space Needle": "Seattle",
            "The Alamo": "San Antonio",
        },
    ),
    "author": (
        "[X] was written by [Y] .",
        {
            "Hamlet": "Shakespeare",
            "Romeo and Juliet": "Shakespeare",
            "War and Peace": "Tolstoy",
            "Don Quixote": "Cervantes",
            "Pride and Prejudice": "Jane Austen",
            "Oliver Twist": "Charles Dickens",
            "The Odyssey": "Homer",
            "Faust": "Goethe",
            "Crime and Punishment": "Dostoevsky",
            "Nineteen Eighty-Four": "George Orwell",
            "The Divine Comedy": "Dante",
            "Moby-Dick": "Herman Melville",
            "Les Miserables": "Victor Hugo",
            "The Old Man and the Sea": "Ernest Hemingway",
            "Harry Potter": "J. K. Rowling",
        },
    ),
}


def cloze(template: str) -> tuple[str, str] | None:
    """``"[X] was born in [Y] ."`` -> ("[X] was born in", " ."): the text before and after the object."""
    template = template.strip()
    if template.count("[X]") != 1 or template.count("[Y]") != 1 or template.index("[Y]") < template.index("[X]"):
        return None
    before, after = template.split("[Y]")
    return before.rstrip(), after.replace(" .", ".").rstrip()


def conflict_rows(facts: list[tuple[str, str, str, str, str]], src: LocalSource) -> list[Row]:
    """Rows of knowledge-conflict examples from (where, relation, template, subject, object) tuples.

    Each row's data: fields `context`, `question`, `subject`, `relation`; `choices` =
    (context answer, memory answer); `gold` = 0 with a context (following it is the measured
    behaviour), 1 without (recall).
    """
    pools: dict[str, list[str]] = {}
    for _, rel, _, _, obj in facts:
        pools.setdefault(rel, [])
        if obj not in pools[rel]:
            pools[rel].append(obj)
    rows = []
    for where, rel, template, subject, obj in facts:
        parts = cloze(template)
        others = sorted(o for o in pools[rel] if o != obj)
        if parts is None or not others:
            continue
        before, after = parts
        question = before.replace("[X]", subject)
        counter = stable_pick(others, src.seed, rel, subject, obj)
        context = f"{question} {counter}{after}" if src.context else ""
        data = {
            "context": context,
            "question": question,
            "subject": subject,
            "relation": rel,
            "choices": [counter, obj],
            "gold": 0 if src.context else 1,
        }
        rows.append(Row(where, data))
    return rows


def table_facts(relations: list[str] | None, task: str) -> list[tuple[str, str, str, str, str]]:
    """The project's own fact table as (where, relation, template, subject, object)."""
    names = _check_relations(relations, list(FACTS), task, "the built-in fact table")
    return [
        (f"facts:{rel}:{subject}", rel, FACTS[rel][0], subject, obj)
        for rel in names
        for subject, obj in FACTS[rel][1].items()
    ]


def lama_facts(root: Path, split: str, relations: list[str] | None, task: str) -> list[tuple[str, str, str, str, str]]:
    """LAMA facts of one split (`train` or `dev`) from ``root/relations.jsonl`` and ``root/P*/{split}.jsonl``."""
    templates = _lama_templates(need_file(root / "relations.jsonl", task, "LAMA relations file"))
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name in templates and cloze(templates[p.name]))
    names = _check_relations(relations, present, task, f"LAMA folder {root}")
    out = []
    for rel in names:
        path = need_file(root / rel / f"{split}.jsonl", task, "LAMA facts file")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                subject, obj = row["sub_label"], row["obj_label"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise TaskError(f"{path}:{n}: a LAMA fact is a JSON object with 'sub_label' and 'obj_label'") from None
            out.append((f"{rel}/{split}.jsonl:{n}", rel, templates[rel], subject, obj))
    return out


def _lama_templates(path: Path) -> dict[str, str]:
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[row["relation"]] = row["template"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise TaskError(f"{path}:{n}: a relation is a JSON object with 'relation' and 'template'") from None
    return out


def _check_relations(wanted: list[str] | None, have: list[str], task: str, where: str) -> list[str]:
    if wanted is None:
        return have
    missing = [r for r in wanted if r not in have]
    if missing:
        raise TaskError(f"task {task!r}: relations {missing} are not in {where}; available: {', '.join(have)}")
    return list(wanted)
