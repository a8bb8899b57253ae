"""The model card (README.md) of an export, and the eval results it can show.

`read_results` accepts the ``results.json`` that `attnedit eval` writes (its
``tasks`` map each task to baseline and patched metrics and their paired
difference: shown as one row per task with the interval and McNemar's p), and
more generally an object whose ``rows`` (or ``results``, or ``tasks``) is a
list of flat records or a map from task name to its metrics (lm-eval's form);
nested objects become dotted columns. Other top-level scalars (model, date)
are listed above the table.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers

from .errors import AttneditError
from .fold import Edit
from .version import __version__

_ROW_KEYS = ("rows", "results", "tasks")


@dataclass(frozen=True)
class ResultsTable:
    """Eval results as a table: where they came from, top-level facts, columns, rows of cells."""

    source: str
    meta: dict[str, str]
    columns: list[str]
    rows: list[list[str]]


def read_results(path: Path) -> ResultsTable:
    """Read a results JSON into a table.

    Args:
        path: a JSON file written by `attnedit eval`.
    Returns:
        A `ResultsTable`.
    Raises:
        AttneditError: the file is missing, not JSON, or has no rows in a form listed in this module's doc.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise AttneditError(f"results file {path}: cannot read it ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AttneditError(f"results file {path}: not valid JSON ({e})") from None
    expected = "an object whose 'rows' (or 'results', 'tasks') is a list of records or a map task -> metrics"
    key = next((k for k in _ROW_KEYS if isinstance(data, dict) and k in data), None)
    if key is None:
        raise AttneditError(f"results file {path}: expected {expected}")
    body = data[key]
    meta = {k: _cell(v) for k, v in data.items() if k != key and (v is None or isinstance(v, (str, int, float, bool)))}
    if isinstance(body, dict) and body and all(_is_paired(v) for v in body.values()):
        return ResultsTable(str(path), meta, list(_PAIRED), [_paired_row(name, r) for name, r in body.items()])
    if isinstance(body, dict) and body:
        records = [{"task": k, **(_flat(v) if isinstance(v, dict) else {"value": v})} for k, v in body.items()]
    elif isinstance(body, list) and body and all(isinstance(r, dict) for r in body):
        records = [_flat(r) for r in body]
    else:
        raise AttneditError(
            f"results file {path}: '{key}' is empty or neither a list of records nor a map; expected {expected}"
        )
    columns = list(dict.fromkeys(k for r in records for k in r))
    rows = [[_cell(r.get(c)) for c in columns] for r in records]
    return ResultsTable(str(path), meta, columns, rows)


_PAIRED = ("task", "n", "metric", "baseline", "patched", "difference", "95% CI", "McNemar p")


def _is_paired(r: Any) -> bool:
    """A task of `attnedit eval`'s results: baseline and patched metrics with their paired difference."""
    return isinstance(r, dict) and all(
        isinstance(r.get(k), dict) and "value" in r[k] for k in ("baseline", "patched", "difference")
    )


def _paired_row(name: str, r: dict) -> list[str]:
    diff = r["difference"]
    ci = diff.get("ci95")
    ci = f"[{ci[0]:+.4g}, {ci[1]:+.4g}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""
    p = (diff.get("mcnemar") or {}).get("p")
    value = diff["value"]
    return [
        name,
        _cell(r.get("n")),
        _cell(r.get("metric")),
        _cell(r["baseline"]["value"]),
        _cell(r["patched"]["value"]),
        f"{value:+.4g}" if isinstance(value, (int, float)) else _cell(value),
        ci,
        _cell(p),
    ]


def _flat(record: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in record.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, name + "."))
        else:
            out[name] = v
    return out


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        text = json.dumps(v)
        return text if len(text) <= 60 else text[:57] + "..."
    return str(v)


def _table(columns: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the card


def model_card(result, model, results: ResultsTable | None = None) -> str:
    """README.md of an export: base model, how to load, what was folded, what stays dynamic, recipe, results.

    Args:
        result: the `attnedit.export.ExportResult`.
        model: the exported model (for its class and dtype).
        results: eval results to show, or None.
    Returns:
        Markdown text.
    """
    plan = result.plan
    title = plan.recipe.name or "attnedit export"
    parts = [
        _front_matter(result.base_model),
        f"# {title} on {result.base_model or 'an unnamed model'}",
        _summary(plan),
        _loading(model, plan),
        _base_section(result, model),
        _edits(plan),
        "## Recipe\n\nThe whole recipe as applied to the base model, every `auto` resolved (also in "
        "`attnedit_recipe.yaml`; the dynamic part alone is `attnedit_dynamic.yaml`):\n\n```yaml\n"
        + plan.recipe.to_yaml()
        + "```",
    ]
    if results is not None:
        parts.append(_results_section(results, result))
    parts.append(_provenance(plan, model))
    return "\n\n".join(p for p in parts if p) + "\n"


def _edits(plan) -> str:
    if not plan.edits:
        return "## Edits\n\nThe recipe has no interventions."
    return "## Edits\n\n" + _table(list(Edit.COLUMNS), [e.row() for e in plan.edits])


def _front_matter(base: str) -> str:
    lines = ["---", "library_name: transformers", "tags:", "- attnedit", "- model-editing"]
    if base.count("/") == 1 and not base.startswith((".", "/", "~")) and not Path(base).expanduser().exists():
        lines.append(f"base_model: {base}")  # a hub id
    return "\n".join(lines + ["---"])


def _summary(plan) -> str:
    n_f, n_d = len(plan.folded), len(plan.dynamic)
    text = (
        f"This folder holds the base model with an attnedit recipe applied: "
        f"{n_f} intervention(s) folded into the weights, {n_d} applied by attnedit at load time."
    )
    if n_d:
        types = ", ".join(sorted({e.type for e in plan.dynamic}))
        text += (
            f"\n\n> **The dynamic edits ({types}) need attnedit.** Plain `transformers` loads the folded "
            "edits only; `config.json` says so under `attnedit`."
        )
    return text


def _loading(model, plan) -> str:
    vlm = hasattr(model.config, "vision_config")
    auto = "AutoModelForImageTextToText" if vlm else "AutoModelForCausalLM"
    lines = [
        "## Load",
        "",
        "```python",
        "import attnedit",
        'model, tokenizer = attnedit.load("DIR")  # every edit'
        + ("; model.attnedit_patch holds the dynamic ones" if plan.dynamic else ""),
        "",
        f"from transformers import {auto}",
        f'model = {auto}.from_pretrained("DIR")  # ' + ("the folded edits only" if plan.dynamic else "every edit"),
    ]
    if plan.dynamic:
        lines.append(
            f'model = {auto}.from_pretrained("DIR", trust_remote_code=True)  # every edit; needs attnedit installed'
        )
    lines.append("```")
    lines += ["", "`DIR` is this folder (or its hub id)."]
    if plan.dynamic:
        lines[-1] += (
            " `model.attnedit_patch.remove()` takes the dynamic edits off again; the folded ones are in the weights."
        )
    return "\n".join(lines)


def _base_section(result, model) -> str:
    info = result.plan.info
    rows = [
        ["name", result.base_model or "(unnamed: built in memory)"],
        ["weights hash", f"`{result.base_hash}`" if result.base_hash else "(not recorded)"],
        ["class", type(model).__name__],
        [
            "text decoder",
            f"{info.n_layers} layers, {info.n_heads} query heads ({info.n_kv_heads} kv), head_dim {info.head_dim}",
        ],
    ]
    base_export = getattr(model.config, "attnedit", None)
    if isinstance(base_export, dict):
        rows.append(["itself", f"an attnedit export of {base_export.get('base_model')} (folded only)"])
    return "## Base model\n\n" + _table(["", ""], rows)


def _results_section(results: ResultsTable, result) -> str:
    text = f"## Evaluation\n\nFrom `{Path(results.source).name}` (copied as `eval_results.json`)."
    other = []
    if results.meta.get("recipe_hash") and results.meta["recipe_hash"] not in (
        result.recipe_hash,
        result.plan.recipe.hash(),
    ):
        other.append("another recipe (its recipe_hash differs)")
    if results.meta.get("model_hash") and result.base_hash and results.meta["model_hash"] != result.base_hash:
        other.append("another base model (its model_hash differs)")
    if other:
        text += "\n\n> **These results were measured with " + " and ".join(other) + " than this export.**"
    if results.meta:
        text += "\n\n" + "\n".join(f"- {k}: {v}" for k, v in results.meta.items())
    return text + "\n\n" + _table(results.columns, results.rows)


def _provenance(plan, model) -> str:
    rows = [
        ["attnedit", __version__],
        ["transformers", transformers.__version__],
        ["torch", torch.__version__],
        ["python", platform.python_version()],
        ["dtype", str(next(model.parameters()).dtype).replace("torch.", "")],
        ["recipe hash", f"`{plan.recipe.hash()}`"],
        ["written", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")],
    ]
    return "## Provenance\n\n" + _table(["", ""], rows)
