"""Export a model with a recipe applied, as a folder that loads with attnedit or plain transformers.

`attnedit.fold` decides what folds into the weights and what stays dynamic.
`export` writes the folded weights, config, tokenizer (processor), the
resolved recipe (`FULL_RECIPE`), its dynamic part (`DYNAMIC_RECIPE`) and a
model card, into a temporary folder renamed into place at the end.
`attnedit.loading.restore` applies the dynamic part to a model loaded from
such a folder (`attnedit.load` calls it); `entry_point` does the same for
``from_pretrained(DIR, trust_remote_code=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import transformers
from transformers import AutoProcessor, AutoTokenizer

from . import card
from .errors import AttneditError
from .fold import Edit, ExportPlan, folded_weights, model_name, out_proj, plan_export
from .loading import CONFIG_KEY, DYNAMIC_RECIPE, FORMAT, model_hash, resolve, restore
from .patch import _ACTIVE
from .recipe import Recipe
from .version import __version__

__all__ = [
    "Edit",
    "ExportPlan",
    "ExportResult",
    "check_target",
    "entry_point",
    "export",
    "plan_export",
    "restore",
    "staged",
]

FULL_RECIPE = "attnedit_recipe.yaml"  # the whole recipe, resolved, as applied to the base model
ENTRY_MODULE = "attnedit_entry"  # loader for from_pretrained(DIR, trust_remote_code=True)
RESULTS_FILE = "eval_results.json"
NOTICE = (
    "The weights carry the folded edits only. The dynamic edits are applied by attnedit: "
    "attnedit.load(DIR), or from_pretrained(DIR, trust_remote_code=True) with attnedit installed."
)


@dataclass(frozen=True)
class ExportResult:
    """Where the export went, its plan, the base model's name and hash, and the hash of the recipe as given."""

    path: Path
    plan: ExportPlan
    base_model: str
    base_hash: str | None
    recipe_hash: str


# --------------------------------------------------------------------------- writing


def export(
    model: torch.nn.Module,
    recipe: Recipe | str | Path,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    force: bool = False,
    results: str | Path | None = None,
    base_model: str | None = None,
    max_shard_size: str | int = "5GB",
    cache_dir: str | os.PathLike | None = None,
) -> ExportResult:
    """Write `model` with `recipe` applied to `out_dir`: folded weights, config, tokenizer, recipe, model card.

    The folder is written beside `out_dir` under a temporary name and renamed
    into place at the end: a failure leaves `out_dir` as it was.

    Args:
        model: the loaded, unpatched model (a causal LM or vision-language model).
        recipe: a `Recipe` or a path to a recipe YAML.
        out_dir: the folder to write; its parent must exist.
        tokenizer: the tokenizer (processor for VLMs); default: loaded from the model's source.
        force: replace `out_dir` if it is a non-empty folder.
        results: a results JSON written by `attnedit eval`, shown in the model card.
        base_model: the base model's name for the card (default: how it was loaded).
        max_shard_size: safetensors shard size.
        cache_dir: the converted-model cache in use, which `out_dir` must not touch (the default is
            always checked).
    Returns:
        An `ExportResult` with the plan (what was folded, what stays dynamic).
    Raises:
        AttneditError: a non-empty `out_dir` without `force`, a patched model, a model that is
            itself an export with dynamic edits, an unreadable results file, an unresolvable `auto`.
        RecipeError: the recipe does not fit the model.
    """
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.from_yaml(recipe)
    out = Path(out_dir).expanduser()
    base = base_model or model_name(model)
    _check_model(model)
    check_target(out, force, base, cache_dir)
    table = card.read_results(Path(results)) if results is not None else None
    plan = plan_export(model, recipe)
    tokenizer = tokenizer if tokenizer is not None else _base_tokenizer(model, base)
    result = ExportResult(out, plan, base, _base_hash(base), recipe.hash())
    with staged(out, force) as tmp:
        _write_weights(model, plan, tmp, max_shard_size)
        _write_config(model, result, tmp)
        tokenizer.save_pretrained(tmp)
        _write_recipes(result, tmp)
        if results is not None:
            shutil.copyfile(results, tmp / RESULTS_FILE)
        (tmp / "README.md").write_text(card.model_card(result, model, table), encoding="utf-8")
    return result


def check_target(out: Path, force: bool, base: str = "", cache_dir=None) -> None:
    """Refuse a target that is a file, a non-empty folder (without force), the model's own folder, the
    current folder or one above it, or the converted-model cache (an export there would replace the
    model every later load reads).

    What an interrupted export of the same target left beside it is cleaned up first (`clean_stale`).
    """
    from .loading import in_alias_cache  # noqa: PLC0415  (loading imports this module's restore)

    out = Path(out)
    if not str(out) or out.name in ("", ".", ".."):
        raise AttneditError(f"the export target {str(out)!r} names no new folder; give a folder name")
    cached = in_alias_cache(out, cache_dir)
    if cached is not None:
        raise AttneditError(
            f"{out} is in or holds attnedit's converted-model cache ({cached}); an export there would replace "
            "the model that every later load reads. Export to another folder"
        )
    cwd = Path.cwd().resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        raise AttneditError(f"{out} is the current folder or holds it; export to a new folder")
    if out.exists() and not out.is_dir():
        raise AttneditError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise AttneditError(f"{out} is a folder that is not empty; pass --force (force=True) to replace it")
    if not out.parent.is_dir():
        raise AttneditError(f"folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise AttneditError(f"cannot write into {out.parent}")
    if base and Path(base).expanduser().is_dir() and Path(base).expanduser().resolve() == out.resolve():
        raise AttneditError(f"{out} is the folder the model was loaded from; export to another folder")
    clean_stale(out)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def clean_stale(out: Path) -> None:
    """Tidy what a killed export of `out` left beside it (`.NAME.<pid>-<rand>.partial` / `.old` folders).

    A `.partial` folder of a process that no longer runs is deleted. A `.old` folder is the previous
    `out`, moved aside just before the new one was renamed in: it is put back if `out` is missing,
    else deleted. Folders of a process still running are left alone.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return
    prefix = f".{out.name}."
    for entry in sorted(out.parent.iterdir()):
        name = entry.name
        if not (name.startswith(prefix) and name.endswith((".partial", ".old")) and entry.is_dir()):
            continue
        tag = name[len(prefix) :].rsplit(".", 1)[0]
        pid = tag.split("-", 1)[0]
        if pid.isdigit() and "-" in tag and (int(pid) == os.getpid() or _pid_alive(int(pid))):
            continue  # an export still running
        if name.endswith(".old") and not out.exists():
            os.rename(entry, out)
        else:
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def staged(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out`, on any failure it is deleted."""
    tmp = out.parent / f".{out.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial"
    tmp.mkdir()  # mode from the umask, as a folder made by hand (mkdtemp would make it private)
    try:
        yield tmp
        _swap(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap(tmp: Path, out: Path, force: bool) -> None:
    """Rename `tmp` to `out`; an existing `out` is moved aside first and put back if that fails."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if out.is_dir() and any(out.iterdir()) and not force:  # it may have appeared while we wrote
        raise AttneditError(f"{out} is a folder that is not empty; pass --force (force=True) to replace it")
    old = out.parent / f".{out.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.old"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _write_weights(model, plan: ExportPlan, tmp: Path, max_shard_size) -> None:
    """save_pretrained with the folded o_proj tensors swapped into the state dict (the model is not changed)."""
    state = model.state_dict()
    names = {id(m): n for n, m in model.named_modules()}
    for layer, layer_plan in plan.fold.items():
        lin = out_proj(model, layer, plan.info)
        weight, bias = folded_weights(lin, layer_plan, plan.info)
        state[f"{names[id(lin)]}.weight"] = weight
        if bias is not None:
            state[f"{names[id(lin)]}.bias"] = bias
    model.save_pretrained(tmp, state_dict=state, max_shard_size=max_shard_size)


def _write_config(model, result: ExportResult, tmp: Path) -> None:
    """Add the attnedit block (and, with dynamic edits, the trust_remote_code loader) to config.json."""
    path = tmp / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    plan = result.plan
    block = {
        "format": FORMAT,
        "version": __version__,
        "base_model": result.base_model,
        "base_model_hash": result.base_hash,
        "recipe_hash": plan.recipe.hash(),
        "folded": [e.to_dict() for e in plan.folded],
        "dynamic": [e.to_dict() for e in plan.dynamic],
        "dynamic_recipe": DYNAMIC_RECIPE if plan.dynamic else None,
        "notice": NOTICE if plan.dynamic else "Every edit is folded into the weights.",
    }
    if isinstance(data.get(CONFIG_KEY), dict):
        block["base_export"] = data[CONFIG_KEY]  # the base model is itself a (folded-only) export
    data[CONFIG_KEY] = block
    loader = _loader_class(model)
    if plan.dynamic and loader is not None:
        data["auto_map"] = {**data.get("auto_map", {}), loader[0]: f"{ENTRY_MODULE}.AttneditLoader"}
        (tmp / f"{ENTRY_MODULE}.py").write_text(_ENTRY_SOURCE.format(cls=loader[1]), encoding="utf-8")
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_recipes(result: ExportResult, tmp: Path) -> None:
    plan = result.plan
    folded = ", ".join(f"#{e.index} {e.type}" for e in plan.folded) or "none"
    head = f"The whole recipe as applied to the base model {result.base_model or '(unnamed)'}, every 'auto' resolved.\n"
    head += f"Do not apply it to this folder's weights: they already hold the folded edits ({folded})."
    (tmp / FULL_RECIPE).write_text(plan.recipe.to_yaml(header=head), encoding="utf-8")
    dynamic = plan.dynamic_recipe()
    if dynamic is not None:
        head = f"The dynamic part of the export, for this folder's weights (folded already: {folded}).\n"
        head += "attnedit.load(DIR) applies it."
        (tmp / DYNAMIC_RECIPE).write_text(dynamic.to_yaml(header=head), encoding="utf-8")


_ENTRY_SOURCE = '''"""Loads this attnedit export with its dynamic edits: from_pretrained(DIR, trust_remote_code=True).

Needs attnedit installed. Without trust_remote_code, transformers loads the folded weights only.
"""
from attnedit.export import entry_point

AttneditLoader = entry_point("{cls}")
'''


def _loader_class(model) -> tuple[str, str] | None:
    """(Auto class, transformers class name) for the trust_remote_code loader, or None for non-transformers classes."""
    name = type(model).__name__
    if getattr(transformers, name, None) is not type(model):
        return None
    auto = "AutoModelForImageTextToText" if hasattr(model.config, "vision_config") else "AutoModelForCausalLM"
    return auto, name


# --------------------------------------------------------------------------- checks and names


def _check_model(model) -> None:
    block = getattr(model.config, CONFIG_KEY, None)
    if isinstance(block, dict) and block.get("dynamic"):
        kinds = ", ".join(d["type"] for d in block["dynamic"])
        raise AttneditError(
            f"this model is an attnedit export whose dynamic edits ({kinds}) are not in its weights; "
            f"export its base model {block.get('base_model') or ''} with one recipe that holds both"
        )
    if model in _ACTIVE:
        raise AttneditError("the model is patched by attnedit; remove the patch and pass the recipe to export instead")


def _base_hash(name: str) -> str | None:
    return model_hash(name) if name else None


def _base_tokenizer(model, base: str):
    if not base:
        raise AttneditError("the model has no name to load its tokenizer from; pass tokenizer=... to export")
    source, extra = resolve(base)
    try:
        if hasattr(model.config, "vision_config"):
            return AutoProcessor.from_pretrained(source, **extra)
        return AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError) as e:
        raise AttneditError(
            f"could not load the tokenizer of {base}: {str(e).splitlines()[0]}; pass tokenizer=..."
        ) from None


# --------------------------------------------------------------------------- loading


def entry_point(class_name: str) -> type:
    """A loader class for ``from_pretrained(DIR, trust_remote_code=True)``: the model class, then `restore`."""
    base = getattr(transformers, class_name)

    def from_pretrained(cls, path, *args, **kwargs):
        kwargs.pop("trust_remote_code", None)
        model = base.from_pretrained(path, *args, **kwargs)
        restore(model, path, revision=kwargs.get("revision"))
        return model

    return type("AttneditLoader", (base,), {"from_pretrained": classmethod(from_pretrained), "__module__": __name__})
