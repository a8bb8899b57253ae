"""Tasks: a spec plus its examples, split into `train` (demonstrations, calibration) and `test` (reporting).

    task = load_task("sst2", data_dir="../shared/data")
    task.kind, task.metric, len(task.split("test"))

`load_task` reads and checks every row at once, so a malformed line, an empty
split or a missing file fails here, before any model is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import facts
from .sources import Row, carve, read_bigbench, read_hub, read_local, resolve_path
from .spec import LocalSource, TaskError, TaskSpec, _merge, _validate, find_spec, read_spec

SPLITS = ("train", "test")
DATA_ENV = "ATTNEDIT_DATA_DIR"


@dataclass(frozen=True)
class Example:
    """One example, independent of any tokenizer.

    Attributes:
        id: stable identifier (``file:line`` or similar).
        fields: the values the prompt template fills in (text, premise, question, context, image, ...).
        choices: the answers scored (label words for classification and pope; options for multiple
            choice; (context answer, memory answer) for knowledge conflict); empty for generation.
        gold: indices of the correct choices.
        targets: acceptable answers for generation.
        label: the label name (classification, pope), else None.
    """

    id: str
    fields: dict[str, Any]
    choices: tuple[str, ...] = ()
    gold: tuple[int, ...] = ()
    targets: tuple[str, ...] = ()
    label: str | None = None

    @property
    def answer(self) -> str:
        """The answer a demonstration shows."""
        if self.choices and self.gold:
            return self.choices[self.gold[0]]
        return self.targets[0] if self.targets else ""


@dataclass(frozen=True)
class Task:
    """A loaded task: its spec and its examples per split."""

    name: str
    spec: TaskSpec
    splits: dict[str, list[Example]] = field(repr=False)
    source: str = ""

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def metric(self) -> str:
        """The primary metric's name."""
        return self.spec.primary_metric

    @property
    def labels(self) -> list[str]:
        return list(self.spec.labels or {})

    def split(self, name: str) -> list[Example]:
        """The examples of `train` or `test`."""
        if name not in self.splits:
            raise TaskError(f"task {self.name!r} has no split {name!r}; splits: {', '.join(self.splits)}")
        return self.splits[name]


def data_dir_from(arg: str | os.PathLike | None) -> Path | None:
    """The data folder: the argument, else $ATTNEDIT_DATA_DIR, else None."""
    raw = arg if arg is not None else os.environ.get(DATA_ENV) or None
    if raw is None:
        return None
    path = Path(raw).expanduser()
    origin = "--data-dir" if arg is not None else "$" + DATA_ENV
    if path.exists() and not path.is_dir():
        raise TaskError(f"data folder {path} (from {origin}) is a file; give the folder that holds the data")
    if not path.is_dir():
        raise TaskError(f"data folder {path} does not exist (from {origin})")
    return path


def load_task(name_or_path: str, data_dir: str | os.PathLike | None = None, **overrides) -> Task:
    """Load a task by built-in name, ``bigbench:<name or path>``, or the path of a task YAML.

    Args:
        name_or_path: e.g. ``"sst2"``, ``"facts-conflict"``, ``"bigbench:navigate"``, ``"my_task.yaml"``.
        data_dir: the data folder (``{data_dir}`` in specs); default $ATTNEDIT_DATA_DIR. Without one,
            tasks with a Hugging Face source read it online.
        **overrides: spec fields to replace, e.g. ``local={"relations": ["P17"], "context": False}``.
    Returns:
        The `Task`, every row read and checked.
    Raises:
        TaskError: unknown task, missing file (with its path), malformed row (file:line), empty split.
    """
    root = data_dir_from(data_dir)
    if name_or_path.startswith("bigbench:"):
        spec, spec_dir = _bigbench_spec(name_or_path, root, overrides)
    else:
        spec, spec_dir = read_spec(find_spec(name_or_path), overrides or None)
    rows, src = _rows(spec, root, spec_dir)
    splits = {split: [_example(spec, src, row) for row in rows[split]] for split in SPLITS}
    slots = spec.template_fields()
    for split, examples in splits.items():
        if not examples:
            raise TaskError(f"task {spec.name!r}: the {split} split is empty")
        missing = slots - set(examples[0].fields)
        if missing:
            raise TaskError(
                f"task {spec.name!r}: the template uses {sorted(missing)}, which the examples lack; "
                f"their fields: {', '.join(map(str, examples[0].fields))}"
            )
    return Task(spec.name, spec, splits, source=name_or_path)


# --------------------------------------------------------------------------- rows per source


def _rows(spec: TaskSpec, root: Path | None, spec_dir: Path) -> tuple[dict[str, list[Row]], Any]:
    """The rows per split and the source they came from: local files, or the hub without a data folder."""
    src = spec.local
    if src is not None and (root is not None or not _needs_data_dir(src) or spec.hf is None):
        return _local_rows(spec, src, root, spec_dir), src
    return {split: read_hub(spec.hf, split, spec.name) for split in SPLITS}, spec.hf


def _needs_data_dir(src: LocalSource) -> bool:
    return any("{data_dir}" in (p or "") for p in (src.test, src.train))


def _local_rows(spec: TaskSpec, src: LocalSource, root: Path | None, spec_dir: Path) -> dict[str, list[Row]]:
    path = lambda raw: resolve_path(raw, root, spec_dir, spec.name)  # noqa: E731
    if src.format == "facts":
        rows = facts.conflict_rows(facts.table_facts(src.relations, spec.name), src)
        return _split_carved(rows, src, spec.name)
    if src.format == "lama":
        lama = path(src.test)
        return {
            split: facts.conflict_rows(facts.lama_facts(lama, file, src.relations, spec.name), src)
            for split, file in (("train", "train"), ("test", "dev"))
        }

    def read(p: Path) -> list[Row]:
        rows = read_bigbench(p, spec.name)[1] if src.format == "bigbench" else read_local(p, src, spec.name)
        return [_image_beside(r, p.parent, src) for r in rows] if spec.kind == "pope" else rows

    test = read(path(src.test))
    if src.train:
        return {"train": read(path(src.train)), "test": test}
    return _split_carved(test, src, spec.name)


def _image_beside(row: Row, folder: Path, src: LocalSource) -> Row:
    """A pope row with its image path made absolute (relative paths are beside the data file)."""
    column = src.fields.get("image", "image")
    if column not in row.data:
        raise TaskError(f"{row.where}: no image column {column!r}")
    path = Path(str(row.data[column])).expanduser()
    return Row(row.where, {**row.data, column: str(path if path.is_absolute() else folder / path)})


def _split_carved(rows: list[Row], src: LocalSource, task: str) -> dict[str, list[Row]]:
    if src.carve is None:
        raise TaskError(
            f"task {task!r} has no train file: add 'carve: {{train: N}}' to cut a fixed train slice from it"
        )
    train, test = carve(rows, src.carve)
    return {"train": train, "test": test}


# --------------------------------------------------------------------------- rows -> examples


def _example(spec: TaskSpec, src, row: Row) -> Example:
    data = row.data
    mapping = (src.fields if src is not None else {}) or {}
    fields = {name: _get(data, column, row, name) for name, column in mapping.items()} if mapping else dict(data)
    for name in sorted(spec.template_fields()):
        if name in fields and (fields[name] is None or isinstance(fields[name], (dict, list))):
            raise TaskError(
                f"{row.where}: field {name!r} is {'null' if fields[name] is None else 'not text'}; "
                "the template needs text there"
            )
    if spec.kind in ("classification", "pope"):
        label = _label(spec, src, data, row)
        words = list(spec.labels.values())
        return Example(row.where, fields, tuple(words), (list(spec.labels).index(label),), label=label)
    if spec.kind != "generation" and ("target_scores" in data or "choices" in data):
        return _choice_example(spec, row, fields)
    target = data.get("target", data.get(getattr(src, "label", None) or "target"))
    if target is None:
        raise TaskError(f"{row.where}: no answer: expected 'target' or the label column")
    targets = tuple(target) if isinstance(target, list) else (str(target),)
    return Example(row.where, fields, targets=targets)


def _choice_example(spec: TaskSpec, row: Row, fields: dict) -> Example:
    data = row.data
    if "target_scores" in data:  # BIG-bench: every option with the top score is correct
        options = list(data["target_scores"])
        scores = [float(data["target_scores"][o]) for o in options]
        gold = tuple(i for i, s in enumerate(scores) if s == max(scores))
        fields["input"] = data["input"].strip()
        if spec.kind == "knowledge_conflict" and len(gold) == 1:  # (context answer, memory answer)
            options = [options[gold[0]]] + [o for i, o in enumerate(options) if i != gold[0]]
            gold = (0,)
    else:
        choices = data["choices"]
        if not isinstance(choices, list) or any(c is None or isinstance(c, (dict, list)) for c in choices):
            raise TaskError(f"{row.where}: 'choices' is a list of texts (a choice is null or not text)")
        options = [str(c) for c in data["choices"]]
        g = data.get("gold")
        gold = tuple(g) if isinstance(g, list) else (int(g),)
        if any(not 0 <= i < len(options) for i in gold):
            raise TaskError(f"{row.where}: gold index {g} is out of range for {len(options)} choices")
    if len(options) < 2:
        raise TaskError(f"{row.where}: needs at least two choices")
    if spec.kind == "knowledge_conflict" and len(options) != 2:
        raise TaskError(f"{row.where}: a knowledge-conflict example has two choices (context answer, memory answer)")
    return Example(row.where, fields, tuple(options), gold)


def _get(data: dict, column: str, row: Row, name: str) -> Any:
    if "{" in column:  # a small template over the row's columns, e.g. "{Title} {Description}"
        try:
            return column.format_map(data)
        except (KeyError, IndexError, ValueError):
            raise TaskError(
                f"{row.where}: field {name!r} = {column!r} names a column the row lacks; it has: "
                f"{', '.join(map(str, data))}"
            ) from None
    if column not in data:
        raise TaskError(
            f"{row.where}: no column {column!r} (for field {name!r}); the row has: {', '.join(map(str, data))}"
        )
    return data[column]


def _label(spec: TaskSpec, src, data: dict, row: Row) -> str:
    column = getattr(src, "label", None) or "label"
    raw = _get(data, column, row, "label")
    key = str(raw).strip()
    label_map = getattr(src, "label_map", None)
    label = label_map.get(key) if label_map else key
    if label is None or label not in spec.labels:
        allowed = list(label_map) if label_map else list(spec.labels)
        raise TaskError(f"{row.where}: label {raw!r} is not one of {allowed}")
    return label


# --------------------------------------------------------------------------- BIG-bench task files

CONFLICT_TASKS = ("contextual_parametric_knowledge_conflicts",)


def _bigbench_spec(arg: str, root: Path | None, overrides: dict) -> tuple[TaskSpec, Path]:
    """A spec for a BIG-bench task JSON, in BIG-bench's own prompt format.

    ``bigbench:NAME`` reads ``{data_dir}/bigbench/NAME.json``; ``bigbench:PATH.json`` reads that file.
    The file has no train split: a fixed 20% slice (seed 0) becomes `train`.
    """
    ref = arg[len("bigbench:") :]
    if ref.endswith(".json"):
        raw = str(Path(ref).expanduser().resolve())
    else:
        raw = "{data_dir}/bigbench/" + ref + ".json"
    path = resolve_path(raw, root, Path.cwd(), arg)
    meta, rows = read_bigbench(path, arg)
    name = str(meta.get("name") or path.stem)
    multiple = all("target_scores" in r.data for r in rows)
    kind = "knowledge_conflict" if name in CONFLICT_TASKS else ("multiple_choice" if multiple else "generation")
    in_prefix = str(meta.get("example_input_prefix", "\nQ: ")).lstrip("\n")
    out_prefix = str(meta.get("example_output_prefix", "\nA: ")).rstrip(" ")
    data = {
        "name": f"bigbench:{name}",
        "kind": kind,
        "description": str(meta.get("description", ""))[:300],
        "local": {"format": "bigbench", "test": str(path.resolve()), "carve": {"train": 0.2, "seed": 0}},
        "instruction": str(meta.get("task_prefix", "")).strip(),
        "template": in_prefix + "{input}" + out_prefix,
        "separator": "\n\n",
        "chat": False,
    }
    if overrides:
        data = _merge(data, overrides)
    return _validate(data, arg, {}), path.parent
