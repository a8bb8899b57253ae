"""Task specs: YAML -> validated, frozen `TaskSpec`.

A task spec says what kind of task it is, where its examples come from (a local
file, BIG-bench JSON, LAMA facts, the project's own fact table, or a Hugging
Face dataset id), how one example becomes a prompt, and how it is scored. The
built-in specs live in ``evals/tasks/*.yaml``; a user passes the path of their
own. ``extends: NAME`` starts from another spec and overrides its fields.
Every problem is reported with its file, line and field, before any model loads.
"""

from __future__ import annotations

import copy
import re
import string
from importlib import resources
from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from attnedit.errors import AttneditError, RecipeError
from attnedit.recipe import _nearest_line, _pydantic_problems, format_path, load_yaml

KINDS = ("classification", "multiple_choice", "generation", "knowledge_conflict", "pope")
METRICS = ("accuracy", "macro_f1", "exact_match", "contains", "context_rate", "memory_rate")
DEFAULT_METRIC = {
    "classification": "accuracy",
    "multiple_choice": "accuracy",
    "generation": "exact_match",
    "knowledge_conflict": "context_rate",
    "pope": "accuracy",
}


class TaskError(AttneditError):
    """A task that cannot be found, parsed or read; the message names the file, line and field."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("labels", "label_map", mode="before", check_fields=False)
    @classmethod
    def _no_yaml_booleans(cls, v):
        if isinstance(v, dict) and any(isinstance(x, bool) for pair in v.items() for x in pair):
            raise ValueError('YAML reads yes/no/true/false/on/off as booleans: quote them, e.g. {"yes": "yes"}')
        return v


class Carve(_Frozen):
    """A fixed train slice cut from the test rows when a source has no train file."""

    train: Union[int, float] = Field(
        description="rows (int) or fraction (float < 1) of the rows that become the train split"
    )
    seed: int = 0

    @model_validator(mode="after")
    def _positive(self):
        if isinstance(self.train, float) and not 0 < self.train < 1:
            raise ValueError("a fraction for 'train' must be between 0 and 1")
        if isinstance(self.train, int) and self.train < 1:
            raise ValueError("'train' must be at least 1 row")
        return self


class LocalSource(_Frozen):
    """Rows from local files. Paths may use ``{data_dir}``; others are relative to the spec file."""

    format: Literal["jsonl", "csv", "tsv", "regex", "bigbench", "lama", "facts"]
    test: str | None = None
    train: str | None = None
    fields: dict[str, str] = Field(
        default_factory=dict, description="template field -> column / regex group / JSON key"
    )
    label: str | None = Field(default=None, description="column holding the label (classification, pope)")
    label_map: dict[str, str] | None = Field(default=None, description="raw label value -> label name of `labels`")
    pattern: str | None = None
    header: bool = True
    columns: list[str] | None = None
    carve: Carve | None = None
    relations: list[str] | None = Field(default=None, description="lama/facts: relation ids to use (default: all)")
    context: bool = Field(default=True, description="lama/facts: state a counterfactual context (False: plain recall)")
    seed: int = Field(default=0, description="lama/facts: seed of the counterfactual objects")

    @model_validator(mode="after")
    def _consistent(self):
        if self.format in ("jsonl", "csv", "tsv", "regex", "bigbench") and not self.test:
            raise ValueError(f"format {self.format!r} needs a 'test' file")
        if self.format == "regex":
            if not self.pattern:
                raise ValueError("format 'regex' needs a 'pattern' with named groups")
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"'pattern' is not a regular expression: {e}") from None
        if self.format == "lama" and not self.test:
            raise ValueError("format 'lama' needs 'test': the LAMA folder (with relations.jsonl)")
        if self.train and self.carve:
            raise ValueError("give either a 'train' file or 'carve', not both")
        return self


class HubSource(_Frozen):
    """Rows from a Hugging Face dataset (needs the `datasets` package and the network)."""

    id: str
    config: str | None = None
    train: str = "train"
    test: str = "test"
    fields: dict[str, str] = Field(default_factory=dict)
    label: str | None = None
    label_map: dict[str, str] | None = None


class TaskSpec(_Frozen):
    """A validated task spec (see docs/evals.md for every field)."""

    name: str
    kind: Literal["classification", "multiple_choice", "generation", "knowledge_conflict", "pope"]
    description: str = ""
    metric: Literal["accuracy", "macro_f1", "exact_match", "contains", "context_rate", "memory_rate"] | None = None
    local: LocalSource | None = None
    hf: HubSource | None = None
    labels: dict[str, str] | None = Field(default=None, description="label name -> the answer word scored for it")
    template: str = Field(description="the prompt of one example, with {field} slots")
    answer: str = Field(default="{answer}", description="how a demonstration's answer is written")
    instruction: str = ""
    separator: str = "\n\n"
    answer_prefix: str | None = Field(
        default=None, description="text between prompt and answer (default ' ' plain, '' chat)"
    )
    chat: bool | None = Field(default=None, description="use the chat template (default: when the tokenizer has one)")
    system: str | None = None
    fewshot: Literal["multiturn", "inline"] = "multiturn"
    normalize: Literal["none", "tokens", "chars"] = "none"
    max_new_tokens: int = Field(default=32, ge=1, le=4096)
    stop: list[str] = Field(default_factory=lambda: ["\n"])

    @model_validator(mode="after")
    def _consistent(self):
        if self.local is None and self.hf is None:
            raise ValueError("a task needs a data source: 'local' (files) and/or 'hf' (a Hugging Face dataset id)")
        if self.kind in ("classification", "pope") and not self.labels:
            raise ValueError(f"a {self.kind} task needs 'labels': {{label name: answer word}}")
        if self.kind == "pope" and set(self.labels or {}) != {"yes", "no"}:
            raise ValueError("a pope task has exactly the labels 'yes' and 'no'")
        bad = {
            "generation": ("accuracy", "macro_f1", "context_rate", "memory_rate"),
            "knowledge_conflict": ("macro_f1", "exact_match", "contains", "accuracy"),
        }.get(self.kind, ("exact_match", "contains", "context_rate", "memory_rate"))
        if self.metric in bad:
            raise ValueError(f"metric {self.metric!r} does not fit a {self.kind} task")
        return self

    @property
    def states_context(self) -> bool:
        """Whether a knowledge_conflict task's prompts state a context (False for its recall form)."""
        return not (self.kind == "knowledge_conflict" and self.local is not None and not self.local.context)

    @property
    def primary_metric(self) -> str:
        if self.metric:
            return self.metric
        if not self.states_context:
            return "memory_rate"
        return DEFAULT_METRIC[self.kind]

    def template_fields(self) -> set[str]:
        return _slots(self.template) | _slots(self.instruction)


def _slots(text: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name}
    except ValueError:
        return set()


# --------------------------------------------------------------------------- finding and parsing specs


def builtin_specs() -> dict[str, Path]:
    """Built-in task names -> their YAML files (shipped in attnedit.evals/tasks)."""
    root = resources.files("attnedit.evals") / "tasks"
    out = {}
    for entry in root.iterdir():
        if entry.name.endswith(".yaml"):
            out[entry.name[: -len(".yaml")]] = Path(str(entry))
    return dict(sorted(out.items()))


def find_spec(name_or_path: str) -> Path:
    """A task argument -> its YAML file. `bigbench:X` is handled by the caller.

    Raises:
        TaskError: neither a file nor a built-in name (the message lists the built-ins).
    """
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise TaskError(f"task file {path} does not exist")
        return path
    builtins = builtin_specs()
    if name_or_path in builtins:
        return builtins[name_or_path]
    raise TaskError(
        f"unknown task {name_or_path!r}; built-in tasks: {', '.join(builtins)}, bigbench:<task name or .json path>; "
        "or the path of a task YAML file"
    )


def read_spec(path: Path, overrides: dict | None = None, _seen: tuple = ()) -> tuple[TaskSpec, Path]:
    """Parse and validate a task YAML (following `extends`). Returns (spec, folder for relative paths).

    Raises:
        TaskError: with one `file:line: field: problem` line per problem.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TaskError(f"{path}: cannot read: {e}") from None
    try:
        data, lines = load_yaml(text, str(path))
    except RecipeError as e:
        raise TaskError("invalid task spec:\n" + "\n".join(f"  {p}" for p in e.problems)) from None
    if not isinstance(data, dict):
        raise TaskError(f"{path}: a task spec is a mapping (name, kind, local/hf, template, ...)")
    base_dir = path.parent
    parent = data.pop("extends", None)
    if parent is not None:
        if parent in _seen:
            raise TaskError(f"{path}: 'extends' loops back to {parent!r}")
        parent_path = find_spec(parent) if not str(parent).endswith((".yaml", ".yml")) else base_dir / parent
        base, base_dir = read_spec(parent_path, None, _seen + (parent,))
        data = _merge(base.model_dump(exclude_unset=True), data)
    if overrides:
        data = _merge(data, overrides)
    return _validate(data, str(path), lines), base_dir


def _merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in ("labels", "fields", "label_map"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _validate(data: dict, source: str, lines: dict) -> TaskSpec:
    try:
        return TaskSpec.model_validate(data)
    except ValidationError as e:
        problems = []
        for rel, msg in _pydantic_problems(e, data, (), TaskSpec.model_fields):
            line = _nearest_line(lines, rel)
            where = f"{source}:{line}" if line else source
            problems.append(f"{where}: {format_path(rel) if rel else '<task>'}: {msg}")
        raise TaskError("invalid task spec:\n" + "\n".join(f"  {p}" for p in problems)) from None
