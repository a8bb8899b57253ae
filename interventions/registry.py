"""The method registry: what each method is and can do, declared once, in its own module.

A method module ends with one declaration::

    METHOD = register(
        Method(
            name="zerotuning",                # the recipe's `type:`
            schema=ZeroTuningSpec,            # its pydantic schema
            compile=compile,                  # (spec, info, model) -> effects
            summary="ZeroTuning: ...",        # one line for `attnedit ls --methods`
            emits=(Bias,),                    # the effect kinds of `attnedit.tables` it compiles to
            search=Search(...),               # its target search for `attnedit calibrate`, or None
        )
    )

Everything else reads these declarations: recipe parsing (`schema`), compiling
(`compile`, checked against `emits`), the patch and `attnedit apply` (`spans`), export
(`fold`, `reads_weights`, `resolve`), `attnedit calibrate` (`search`: which
task kinds, which `--param`s with their types and ranges), the lm-eval
harness (`per_input`) and `attnedit ls`. Nothing outside `attnedit.interventions`
names a method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from attnedit.errors import AttneditError, RecipeError

# --------------------------------------------------------------------------- search parameters


@dataclass(frozen=True)
class Param:
    """One parameter of a method's search, given as ``attnedit calibrate --param NAME=VALUE``.

    Attributes:
        name: the key after ``--param``.
        type: int, float or str (the type of one value).
        help: what it sets, for `attnedit ls --methods` and error messages.
        default: the value the search uses when it is not given (for help only).
        choices: the allowed values (str parameters), or () for any.
        ge, gt, le: bounds of a number (inclusive, exclusive, inclusive), or None.
        many: a comma-separated list of values (``gammas=0.5,2,3``).
    """

    name: str
    type: type
    help: str
    default: Any = None
    choices: tuple = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    many: bool = False

    def allowed(self) -> str:
        """What is allowed, in words: 'an integer >= 1', 'memory or context', 'a list of numbers > 0'."""
        if self.choices:
            one = " or ".join(map(str, self.choices)) if len(self.choices) < 3 else "one of " + ", ".join(self.choices)
        else:
            one = {int: "an integer", float: "a number", str: "a string"}[self.type]
            bounds = [f"{op} {v:g}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le)) if v is not None]
            one += (" " + " and ".join(bounds)) if bounds else ""
        if self.many:
            noun = one.replace("an integer", "integers").replace("a number", "numbers").replace("a string", "strings")
            return f"a comma-separated list of {noun}"
        return one

    def parse(self, value: Any) -> Any:
        """The typed value of a command-line string (or of a value already typed).

        Raises:
            ValueError: the value is not allowed; the message says what is.
        """
        if self.many:
            items = (
                value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
            )
            if not items or any(isinstance(v, str) and not v.strip() for v in items):
                raise ValueError(self.allowed())
            return [self._one(v) for v in items]
        if isinstance(value, (list, tuple)):
            raise ValueError(self.allowed())
        return self._one(value)

    def _one(self, value: Any) -> Any:
        text = value.strip() if isinstance(value, str) else value
        try:
            if isinstance(text, bool):
                raise ValueError
            if self.type is int:
                out = int(text) if isinstance(text, str) else text
                if not isinstance(out, int) or isinstance(out, bool):
                    raise ValueError
            elif self.type is float:
                out = float(text)
                if not math.isfinite(out):
                    raise ValueError
            else:
                out = str(text)
        except (TypeError, ValueError):
            raise ValueError(self.allowed()) from None
        if self.choices and out not in self.choices:
            raise ValueError(self.allowed())
        if (
            (self.ge is not None and out < self.ge)
            or (self.gt is not None and out <= self.gt)
            or (self.le is not None and out > self.le)
        ):
            raise ValueError(self.allowed())
        return out


# --------------------------------------------------------------------------- searches


@dataclass(frozen=True)
class Search:
    """A method's target search, run by `attnedit calibrate` (`attnedit.interventions.calibration`).

    Attributes:
        find: ``find(spec, cal: Calibration) -> Found``.
        about: one line, what it searches (for `attnedit ls --methods` and docs).
        scores_on: task kinds whose examples score its candidates (``cal.score``).
        reads: {task kind: ``inputs(task, examples, tokenizer) -> list``}: task kinds whose examples the
            search reads itself, turned into what `find` gets as ``cal.examples`` (PH3's conflict prompts).
        params: the ``--param`` options it takes.
        kinds_for: ``kinds_for(spec) -> (task kinds, why) | None``: for a spec whose fields narrow the
            task kinds its search runs on, those kinds (some of `task_kinds`) and the fields that narrow
            them, in words (PH3's ``ablation: zero`` searches on knowledge conflicts only); None from it,
            or no `kinds_for`, allows every one of `task_kinds`. Checked by `check_task` before any
            model loads.
        needs_context: on a knowledge_conflict task, the search needs prompts that state a context
            (PH3 scores memory against context); the task's recall form (no context) is refused.
    A search with neither `scores_on` nor `reads` needs no task: it reads the model only (VAR's sink dimensions).
    """

    find: Callable[..., Any]
    about: str
    scores_on: tuple[str, ...] = ()
    reads: Mapping[str, Callable[..., list]] = field(default_factory=dict)
    params: tuple[Param, ...] = ()
    kinds_for: Callable[[Any], tuple[tuple[str, ...], str] | None] | None = None
    needs_context: bool = False

    @property
    def task_kinds(self) -> tuple[str, ...]:
        """Every task kind it calibrates on; () when it needs no task."""
        return tuple(dict.fromkeys((*self.scores_on, *self.reads)))

    @property
    def needs_task(self) -> bool:
        return bool(self.task_kinds)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


# --------------------------------------------------------------------------- methods


def _never(spec) -> bool:
    return False


@dataclass(frozen=True)
class Method:
    """One intervention method, as its module declares it.

    Attributes:
        name: the recipe's `type:`.
        schema: its pydantic schema (a subclass of `attnedit.recipe.InterventionSpec`).
        compile: ``compile(spec, info, model) -> list of effects`` (see `attnedit.tables`).
        summary: one line for `attnedit ls --methods` and docs.
        emits: the effect kinds (classes of `attnedit.tables`: Bias, MoveEffect, Scale, Detect,
            ForwardHook) its compile step returns; compiling refuses any other.
        search: its target search, or None (targets are given, or chosen per input).
        per_input: it detects something in each input at prefill (attention sinks), so padding
            that enters the detection changes its result (lm-eval batches are padded without a mask).
        spans: for a method that reads highlighted spans given with the input (PASTA):
            ``spans(tokenizer, texts, recipe, add_special_tokens=...) -> (encoding, spans)``, which
            encodes prompts with their spans marked; None for the others.
        fold: how its output scales fold into the weights on export, in words; None when it always
            stays dynamic. An intervention folds only when its method folds and every effect it
            compiled to is a `Scale`.
        reads_weights: ``reads_weights(spec) -> bool``: its compile step reads the model's weights
            (so it would see folded weights when rebuilt at load).
        resolve: ``resolve(spec, effects) -> spec``: the spec with each 'auto' that compiling found in
            the weights written out (for export), or None.
    """

    name: str
    schema: type
    compile: Callable[..., list]
    summary: str
    emits: tuple[type, ...]
    search: Search | None = None
    per_input: bool = False
    spans: Callable[..., tuple] | None = None
    fold: str | None = None
    reads_weights: Callable[[Any], bool] = _never
    resolve: Callable[[Any, list], Any] | None = None

    @property
    def needs_spans(self) -> bool:
        return self.spans is not None

    def __post_init__(self):
        if isinstance(self.reads_weights, bool):
            constant = self.reads_weights
            object.__setattr__(self, "reads_weights", lambda spec: constant)
        if not self.emits:
            raise ValueError(f"method {self.name!r} declares no effect kind (emits)")


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry; refuses a name registered twice. Returns the method."""
    if method.name in _METHODS:
        raise ValueError(f"intervention type {method.name!r} is registered twice")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (for tests that register their own)."""
    _METHODS.pop(name, None)


def get(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise RecipeError([f"unknown intervention type {name!r}; allowed: {', '.join(names())}"]) from None


def names() -> list[str]:
    return sorted(_METHODS)


def methods() -> list[Method]:
    return [_METHODS[n] for n in names()]


# --------------------------------------------------------------------------- checks before any model loads


def searched(types: Sequence[str]) -> dict[str, Search]:
    """{type: its search} for the given intervention types that have one, in order."""
    return {t: get(t).search for t in dict.fromkeys(types) if get(t).search is not None}


def check_params(types: Sequence[str], options: Mapping[str, Any]) -> dict:
    """Check ``--param`` options against the searches of a recipe's intervention types.

    Args:
        types: the recipe's intervention types (in recipe order).
        options: {name: value}; a value is a command-line string (``"0.5,2,3"``) or already typed.
    Returns:
        {name: typed value}.
    Raises:
        AttneditError: one line per problem, naming the parameter, its method and what is allowed.
    """
    searches = searched(types)
    problems, out = [], {}
    for name, value in options.items():
        shown = f"--param {name}={_show(value)}"
        owners = [(t, s.param(name)) for t, s in searches.items() if s.param(name) is not None]
        if not owners:
            takes = "; ".join(f"{t}: {', '.join(p.name for p in s.params)}" for t, s in searches.items() if s.params)
            if takes:
                problems.append(f"{shown}: no search of this recipe takes {name!r}; allowed: {takes}")
            elif searches:
                problems.append(f"{shown}: the searches of this recipe ({', '.join(searches)}) take no parameter")
            else:
                kinds = ", ".join(dict.fromkeys(types)) or "none"
                problems.append(f"{shown}: this recipe's interventions ({kinds}) have no search to pass it to")
            continue
        for t, p in owners:
            try:
                out[name] = p.parse(value)
            except ValueError as e:
                problems.append(f"{shown}: {name} ({t}: {p.help}) is {e}")
    if problems:
        raise AttneditError("\n".join(problems))
    return out


def check_task(specs: Sequence[Any], task: str | None, kind: str | None, context: bool = True) -> None:
    """Check that each search of a recipe can run on a task (None: no --task given).

    Args:
        specs: the recipe's interventions (in recipe order); an intervention type (a str) is checked
            against its method's task kinds only, a spec also against its search's `kinds_for`.
        task, kind: the task's name and kind, or None and None.
        context: whether a knowledge_conflict task's prompts state a context (False: its recall form).
    Raises:
        AttneditError: one line per problem: a search needs a task and none is given, or the task's
            kind is not one it (or, narrowed by its fields, this spec's search) calibrates on.
    """
    problems = []
    for item in specs:
        t = item if isinstance(item, str) else item.type
        s = get(t).search
        if s is None or not s.needs_task:
            continue
        if task is None:
            problems.append(f"calibrating {t} needs --task: a {_or(s.task_kinds)} task")
        elif kind not in s.task_kinds:
            problems.append(f"{t}'s search calibrates on a {_or(s.task_kinds)} task; {task!r} is {kind}")
        elif not isinstance(item, str) and s.kinds_for is not None and (narrowed := s.kinds_for(item)) is not None:
            kinds, why = narrowed
            if kind not in kinds:
                problems.append(f"{t} with {why} calibrates on a {_or(kinds)} task only; {task!r} is {kind}")
        if s.needs_context and kind == "knowledge_conflict" and not context:
            problems.append(
                f"{t}'s search needs knowledge conflicts whose prompts state a context; {task!r} is the recall "
                "form (no context): use its conflict task (e.g. lama-conflict, facts-conflict)"
            )
    if problems:
        raise AttneditError("\n".join(dict.fromkeys(problems)))


def _or(kinds: Sequence[str]) -> str:
    return kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + " or " + kinds[-1]


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
