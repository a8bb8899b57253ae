"""Recipes: YAML -> validated, frozen `Recipe`.

A recipe is a list of interventions, each picked by its `type:` from the method
registry (`attnedit.interventions`). Parsing needs no model and no weights;
`Recipe.check_model` checks layer and head indices against a model's config.
Every problem is reported at once, each with its file, line and field path.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from attnedit.interventions import registry

from .errors import RecipeError
from .modelinfo import ModelInfo

Backend = Literal["auto", "reference", "triton"]  # the kernel backends (attnedit.kernels) a recipe may ask for
BACKENDS: tuple[str, ...] = get_args(Backend)
_SLICE_RE = re.compile(r"^\s*(-?\d+)?\s*:\s*(-?\d+)?\s*$")

# --------------------------------------------------------------------------- YAML with line numbers


class _LineLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser where installed: ~20x faster
    """SafeLoader that refuses duplicate keys (a silent override is a recipe bug)."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode, deep: bool = False):
    keys = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in keys:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        keys.add(key)
    return loader.construct_mapping(node, deep=deep)


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Recursive(Exception):
    def __init__(self, node: yaml.Node):
        self.line = node.start_mark.line + 1


def _line_map(node: yaml.Node, path: tuple = (), out: dict | None = None, inside: tuple = ()) -> dict[tuple, int]:
    """Map each data path (tuple of keys / indices) to its 1-based line in the YAML text.

    Raises _Recursive for a node that contains itself (an anchor used inside its own value).
    """
    out = {} if out is None else out
    if any(node is n for n in inside):
        raise _Recursive(node)
    inside = inside + (node,)
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag.endswith(":int"):
                key = int(key)
            out[path + (key,)] = key_node.start_mark.line + 1
            _line_map(value_node, path + (key,), out, inside)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, path + (i,), out, inside)
    return out


def load_yaml(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML text; return the data and a path -> line map. Raises RecipeError."""
    try:
        loader = _LineLoader(text)
        try:
            node = loader.get_single_node()
            lines = _line_map(node) if node is not None else {}
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except _Recursive as e:
        raise RecipeError(
            [f"{source}:{e.line}: an anchor (&name) is used inside its own value; not allowed"], source
        ) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else "?"
        raise RecipeError([f"{source}:{line}: not valid YAML: {e.problem or e}"], source) from None
    except yaml.YAMLError as e:  # pragma: no cover - non-marked errors are rare
        raise RecipeError([f"{source}: not valid YAML: {e}"], source) from None
    return data, lines


def format_path(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<recipe>"


# --------------------------------------------------------------------------- layer and head selectors

LayerItem = Union[int, str]
LayerSel = Union[Literal["all"], str, list[LayerItem]]
HeadSel = Union[Literal["all"], list[int], dict[int, Union[Literal["all"], list[int]]]]


def _check_slice(text: str) -> str:
    if not _SLICE_RE.match(text):
        raise ValueError(
            f"'{text}' is not a layer range; write 'start:stop' (Python slice, stop excluded, negatives "
            f"count from the end)"
        )
    return text


def resolve_layers(sel: LayerSel, n_layers: int) -> list[int]:
    """Expand a layer selector into sorted layer indices (no bounds check for explicit ints)."""
    if sel == "all":
        return list(range(n_layers))
    items = [sel] if isinstance(sel, str) else sel
    out: set[int] = set()
    for item in items:
        if isinstance(item, int):
            out.add(item)
        else:
            m = _SLICE_RE.match(item)
            start = int(m.group(1)) if m.group(1) else None
            stop = int(m.group(2)) if m.group(2) else None
            out.update(range(n_layers)[slice(start, stop)])
    return sorted(out)


class InterventionSpec(BaseModel):
    """Fields every intervention has. A method's schema subclasses this.

    `layers`: ``all``, a range string ``"2:-1"`` (Python slice), or a list of
    layer indices and range strings. `heads`: ``all``, a list of query-head
    indices, or a map ``{layer: [heads]}`` (PASTA's published head-set format),
    in which case the map alone says where the intervention applies.
    """

    # strict: `gamma: true` or `gamma: "2"` is refused, not read as 1.0 or 2.0 (an int still reads as a float)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    type: str
    layers: LayerSel = "all"
    heads: HeadSel = "all"

    SUMMARY: ClassVar[str] = ""

    @model_validator(mode="before")
    @classmethod
    def _yaml_forms(cls, data):
        """What strict mode would refuse but YAML and JSON can only write so: a list for a tuple field,
        and integer map keys written as strings (``{"2": [1]}``, as JSON writes them)."""
        if isinstance(data, dict):
            data = dict(data)
            for name, info in cls.model_fields.items():
                if get_origin(info.annotation) is tuple and isinstance(data.get(name), list):
                    data[name] = tuple(data[name])
                elif isinstance(data.get(name), dict):
                    data[name] = _int_keys(data[name])
        return data

    @field_validator("layers")
    @classmethod
    def _check_layers(cls, v):
        if isinstance(v, str) and v != "all":
            _check_slice(v)
        if isinstance(v, list):
            if not v:
                raise ValueError("empty layer list; use 'all' or name at least one layer")
            for item in v:
                if isinstance(item, str):
                    _check_slice(item)
                elif item < 0:
                    raise ValueError(
                        f"layer {item} is negative; use a range string such as '-4:' to count from the end"
                    )
        return v

    @field_validator("heads")
    @classmethod
    def _check_heads(cls, v):
        lists = v.values() if isinstance(v, dict) else ([v] if isinstance(v, list) else [])
        if isinstance(v, dict):
            if not v:
                raise ValueError("empty head map; use 'all' or {layer: [heads]}")
            if any(k < 0 for k in v):
                raise ValueError("layer keys of a head map must be >= 0")
        for hs in lists:
            if hs == "all":
                continue
            if not hs:
                raise ValueError("empty head list")
            if any(h < 0 for h in hs):
                raise ValueError("head indices must be >= 0")
        return v

    def model_post_init(self, __context) -> None:
        if isinstance(self.heads, dict) and "layers" in self.model_fields_set and self.layers != "all":
            raise ValueError("give either 'layers' or a head map {layer: [heads]} in 'heads', not both")

    # -- resolution against a model ------------------------------------------------------------
    def targets(self, info: ModelInfo) -> dict[int, list[int]]:
        """The (layer -> query heads) this intervention touches on a model."""
        if isinstance(self.heads, dict):
            return {
                layer: list(range(info.n_heads)) if hs == "all" else sorted(set(hs))
                for layer, hs in sorted(self.heads.items())
            }
        heads = list(range(info.n_heads)) if self.heads == "all" else sorted(set(self.heads))
        return {layer: heads for layer in resolve_layers(self.layers, info.n_layers)}

    def check_model(self, info: ModelInfo) -> list[tuple[tuple, str]]:
        """Problems of this spec on a model, as (field path, message) pairs."""
        problems = []
        L, H = info.n_layers, info.n_heads
        if isinstance(self.heads, dict):
            for layer, hs in self.heads.items():
                if layer >= L:
                    problems.append(
                        (("heads", layer), f"layer {layer} does not exist: the model has layers 0..{L - 1}")
                    )
                if hs != "all":
                    bad = [h for h in hs if h >= H]
                    if bad:
                        problems.append(
                            (("heads", layer), f"heads {bad} do not exist: the model has query heads 0..{H - 1}")
                        )
        else:
            items = [self.layers] if isinstance(self.layers, str) else self.layers
            for i, item in enumerate(items):
                if isinstance(item, int) and item >= L:
                    problems.append((("layers", i), f"layer {item} does not exist: the model has layers 0..{L - 1}"))
            if not resolve_layers(self.layers, L):
                problems.append((("layers",), f"selects no layer of a model with {L} layers"))
            if isinstance(self.heads, list):
                bad = [h for h in self.heads if h >= H]
                if bad:
                    problems.append((("heads",), f"heads {bad} do not exist: the model has query heads 0..{H - 1}"))
        problems.extend(self.check_method_model(info))
        return problems

    def check_method_model(self, info: ModelInfo) -> list[tuple[tuple, str]]:
        """Method-specific model checks (a VLM method on a text model, ...). Override."""
        return []

    def notes(self) -> list[tuple[tuple, str]]:
        """What is valid but needs a step before the recipe applies, as (field path, message). Override."""
        return []


def _int_keys(value: Any) -> Any:
    """A map with its decimal-string keys made ints, nested maps too."""
    if not isinstance(value, dict):
        return value
    return {int(k) if isinstance(k, str) and k.isdecimal() else k: _int_keys(v) for k, v in value.items()}


class _RecipeHead(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str | None = None
    description: str | None = None
    model: str | None = None
    backend: Backend = "auto"
    interventions: list[Any] = Field(default_factory=list)
    provenance: dict[str, Any] | None = None


# --------------------------------------------------------------------------- the Recipe


@dataclass(frozen=True)
class Recipe:
    """A validated, frozen recipe.

    Build one with `Recipe.from_yaml(path)`, `Recipe.from_str(text)` or
    `Recipe.from_dict(data)`. Interventions compose in recipe order (see
    `attnedit.tables` for the order of effects).
    """

    interventions: tuple[InterventionSpec, ...] = ()
    name: str | None = None
    description: str | None = None
    model: str | None = None
    backend: str = "auto"
    provenance: dict | None = None
    source: str | None = field(default=None, compare=False)
    lines: dict = field(default_factory=dict, compare=False, repr=False)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise RecipeError([f"{path}: no such file"], str(path))
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError([f"{path}: cannot read: {e}"], str(path)) from None
        return cls.from_str(text, source=str(path))

    @classmethod
    def from_str(cls, text: str, source: str = "<string>") -> "Recipe":
        data, lines = load_yaml(text, source)
        if data is None:
            data = {}
        return cls.from_dict(data, source=source, lines=lines)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>", lines: dict | None = None) -> "Recipe":
        lines = lines or {}
        problems: list[str] = []

        def report(path: tuple, msg: str) -> None:
            line = _nearest_line(lines, path)
            where = f"{source}:{line}" if line else source
            problems.append(f"{where}: {format_path(path)}: {msg}")

        if not isinstance(data, dict):
            report((), f"a recipe is a mapping with an 'interventions' list, got {type(data).__name__}")
            raise RecipeError(problems, source)
        try:
            head = _RecipeHead.model_validate(data)
        except ValidationError as e:
            for path, msg in _pydantic_problems(e, data, (), _RecipeHead.model_fields):
                report(path, msg)
            raise RecipeError(problems, source) from None
        if not isinstance(data.get("interventions", []), list):
            report(("interventions",), "must be a list of interventions")
        specs, indices = [], []
        for i, item in enumerate(head.interventions):
            path = ("interventions", i)
            if not isinstance(item, dict):
                report(path, f"an intervention is a mapping with a 'type', got {type(item).__name__}")
                continue
            kind = item.get("type")
            if kind is None:
                report(path + ("type",), f"missing; allowed: {', '.join(registry.names())}")
                continue
            if not isinstance(kind, str) or kind not in registry.names():
                report(path + ("type",), f"unknown type {kind!r}; allowed: {', '.join(registry.names())}")
                continue
            schema = registry.get(kind).schema
            try:
                specs.append(schema.model_validate(item))
                indices.append(i)
            except ValidationError as e:
                for sub, msg in _pydantic_problems(e, item, path, schema.model_fields):
                    report(sub, msg)
        if problems:
            err = RecipeError(problems, source)
            err.valid = list(zip(indices, specs))  # what did validate: `attnedit validate` checks it against a model
            err.model = head.model
            err.lines = lines
            raise err
        return cls(
            interventions=tuple(specs),
            name=head.name,
            description=head.description,
            model=head.model,
            backend=head.backend,
            provenance=copy.deepcopy(head.provenance),
            source=source,
            lines=lines,
        )

    # -- checks against a model -------------------------------------------------------------------
    def check_model(self, info: ModelInfo) -> None:
        """Raise RecipeError listing every layer/head index or method requirement the model fails."""
        problems = self.model_problems(info)
        if problems:
            raise RecipeError(problems, self.source)

    def model_problems(self, info: ModelInfo) -> list[str]:
        """One line per layer/head index or method requirement the model fails (`check_model` raises them)."""
        return model_problems(list(enumerate(self.interventions)), info, self.lines, self.source)

    def warnings(self) -> list[str]:
        """What is valid but likely not meant: no intervention at all, or what a method's `notes` flag."""
        if not self.interventions:
            return [f"{self.source or '<recipe>'}: the recipe has no interventions; it changes nothing"]
        out = []
        for i, spec in enumerate(self.interventions):
            for sub, msg in spec.notes():
                path = ("interventions", i) + sub
                line = _nearest_line(self.lines, path)
                where = f"{self.source}:{line}" if line else (self.source or "<recipe>")
                out.append(f"{where}: {format_path(path)}: {msg}")
        return out

    # -- output -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out: dict[str, Any] = {}
        for key in ("name", "description", "model"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.backend != "auto":
            out["backend"] = self.backend
        out["interventions"] = [_spec_dict(spec) for spec in self.interventions]
        if self.provenance is not None:
            out["provenance"] = copy.deepcopy(self.provenance)
        return out

    def to_yaml(self, header: str | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)
        if header:
            text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + text
        return text

    def hash(self) -> str:
        """sha256 of the canonical JSON of what the recipe does (name, description, provenance excluded)."""
        body = {"backend": self.backend, "interventions": self.to_dict()["interventions"]}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def replace(self, **changes) -> "Recipe":
        fields = {
            k: getattr(self, k)
            for k in ("interventions", "name", "description", "model", "backend", "provenance", "source", "lines")
        }
        fields.update(changes)
        return Recipe(**fields)

    def __len__(self) -> int:
        return len(self.interventions)


def model_problems(specs: list[tuple[int, InterventionSpec]], info: ModelInfo, lines: dict, source) -> list[str]:
    """One line per problem of the (index, spec) pairs on a model, with file, line and field."""
    problems = []
    for i, spec in specs:
        for sub, msg in spec.check_model(info):
            path = ("interventions", i) + sub
            line = _nearest_line(lines, path)
            where = f"{source}:{line}" if line else (source or "<recipe>")
            problems.append(f"{where}: {format_path(path)}: {msg} (model: {info.name})")
    return problems


# --------------------------------------------------------------------------- error formatting


def _nearest_line(lines: dict, path: tuple) -> int | None:
    while True:
        if path in lines:
            return lines[path]
        if not path:
            return None
        path = path[:-1]


def _data_path(data: Any, loc: tuple) -> tuple[tuple, bool]:
    """Turn a pydantic `loc` into a path in the data.

    Returns (path, in_union): `in_union` is True when the loc runs into a tag
    pydantic adds for a branch of a union (then the path stops at the field).
    """
    path: list = []
    cur = data
    for i, part in enumerate(loc):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            cur = cur[part]
        elif i == len(loc) - 1 and isinstance(cur, dict):
            path.append(part)  # a missing key
            break
        else:
            return tuple(path), True
        path.append(part)
    return tuple(path), False


def _pydantic_problems(err: ValidationError, data: Any, prefix: tuple, fields: dict) -> list[tuple[tuple, str]]:
    """One (path, message) per distinct problem; a union field reports once."""
    out: dict[tuple, str] = {}
    for e in err.errors(include_url=False):
        rel, in_union = _data_path(data, e["loc"])
        kind = e["type"]
        if kind == "value_error":
            msg = str(e.get("ctx", {}).get("error", e["msg"]))
        elif in_union:
            forms = _FORMS.get(rel[0] if rel else "", e["msg"])
            msg = f"invalid value {_short(_get(data, rel))}; allowed: {forms}"
        elif kind == "extra_forbidden":
            msg = f"unknown field; allowed: {', '.join(fields)}"
        elif kind == "missing":
            msg = "required field is missing"
        else:
            got = e.get("input")
            msg = e["msg"] if isinstance(got, (dict, list)) else f"{e['msg']} (got {_short(got)})"
        out.setdefault(prefix + rel, msg)
    return list(out.items())


_FORMS = {
    "layers": "'all', a range string such as '2:-1', or a list of layer indices and range strings",
    "heads": "'all', a list of head indices, or a map {layer: [heads]}",
    "sink_dims": "'auto' or a list of hidden-state dimensions",
}


def _spec_dict(spec: "InterventionSpec") -> dict:
    """A spec as recipe YAML writes it: a head map {layer: [heads]} names its layers, so `layers` is left out."""
    out = _plain(spec.model_dump(mode="python"))
    if isinstance(spec.heads, dict):
        out.pop("layers", None)
    return out


def _plain(obj: Any) -> Any:
    """Python data with tuples as lists (for YAML/JSON), int keys kept."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _get(data: Any, path: tuple) -> Any:
    for p in path:
        try:
            data = data[p]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) < 60 else text[:57] + "..."
