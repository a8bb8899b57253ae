"""attnedit calibrate: run each method's own target search and write the resolved recipe."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from attnedit.progress import Lines

from .common import (
    BackendOpt,
    CacheOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    UsageError,
    check_device,
    check_seed,
    check_writable,
    console,
    err_console,
    load_model,
    load_recipe,
    show,
    write_atomic,
)

COMMAND = "calibrate"
ORDER = 30


def run(
    recipe: Annotated[
        str,
        typer.Argument(
            help="Recipe YAML file or built-in recipe name; its interventions are the search's starting point."
        ),
    ],
    task: Annotated[
        str | None,
        typer.Option(
            "--task",
            "-t",
            help="Task whose train split scores the candidates (sst2, trec, cb, rte, agnews, lama-conflict, a task "
            "YAML). Not needed by searches that read the model only (`attnedit ls --methods`).",
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the calibrated recipe (YAML).")] = Path(
        "calibrated.yaml"
    ),
    model: ModelOpt = None,
    data_dir: Annotated[Path | None, typer.Option(help="Evaluation data folder (default $ATTNEDIT_DATA_DIR).")] = None,
    limit: Annotated[
        int, typer.Option(min=1, help="Calibration examples, drawn (seeded) from the task's train split.")
    ] = 128,
    max_candidates: Annotated[
        int | None, typer.Option(min=0, help="Stop after scoring this many candidates per search.")
    ] = None,
    shots: Annotated[int, typer.Option(min=0, help="Demonstrations per prompt (from the train split).")] = 0,
    objective: Annotated[
        str,
        typer.Option(
            help="accuracy (the task's metric), logprob (mean log-probability of the gold answer) or entropy "
            "(unsupervised: minus the answer entropy)."
        ),
    ] = "accuracy",
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-P",
            help="Search option KEY=VALUE (repeatable), e.g. profile=head, gammas=0.5,2,3, k=5, prune=context; "
            "`attnedit ls --methods` lists each search's options.",
        ),
    ] = None,
    holdout: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=0.95,
            help="Fraction of the drawn examples kept out of the search (seeded); the recipe and the unpatched "
            "model are scored on them, to show overfitting. 0: none.",
        ),
    ] = 0.2,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per forward.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the example draw and the demonstrations.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
    backend: BackendOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Find each intervention's targets with its paper's search on a task's train split; write the calibrated recipe.

    Each method's search, its task kinds and its --param options: `attnedit ls --methods`. The recipe
    written holds the resolved heads and parameters and their provenance (model hash, data, every
    candidate's score)."""
    from attnedit.interventions import calibration as C  # noqa: PLC0415
    from attnedit.interventions import registry  # noqa: PLC0415
    from attnedit.loading import DEFAULT_MODEL, load_config, model_hash  # noqa: PLC0415
    from attnedit.modelinfo import ModelInfo  # noqa: PLC0415

    if objective not in ("accuracy", "logprob", "entropy"):
        raise UsageError(f"--objective {objective!r}; allowed: accuracy, logprob, entropy")
    check_seed(seed)
    check_device(device)
    raw = _options(param or [])
    rec = load_recipe(recipe)
    types = [s.type for s in rec.interventions]
    options = registry.check_params(types, raw)
    if task is None:
        registry.check_task(rec.interventions, None, None)  # before any model loads
    check_writable(out, force)
    name = model or rec.model or DEFAULT_MODEL
    info = ModelInfo.from_config(load_config(name, cache_dir), name=name)
    rec.check_model(info)  # before loading weights
    the_task, drawn = _task(task, data_dir, limit, seed, rec)
    examples, held = C.split_holdout(drawn, holdout, seed) if the_task is not None else (drawn, [])
    m, tok = load_model(name, dtype, device, cache_dir)
    started = time.time()
    with _progress() as progress:
        cal = C.Calibration(
            m,
            tok,
            info,
            objective=objective,
            max_candidates=max_candidates,
            seed=seed,
            progress=progress,
            options=options,
            task=the_task,
            examples=examples,
        )
        scorer = dict(objective=objective, shots=shots, seed=seed, batch_size=batch_size, backend=backend)
        if the_task is not None:
            cal.scorer_for = lambda part: C.task_scorer(m, tok, the_task, part, **scorer)
            cal.score = cal.scorer_for(examples)
            cal.prompts = cal.score.prompts
        resolved, searches = C.calibrate(rec, cal)
        final = cal.score(resolved) if cal.score is not None and resolved.interventions else None
        unpatched = cal.score(None) if cal.score is not None else None
        check = (
            C.heldout_check(C.task_scorer(m, tok, the_task, held, **scorer), resolved, objective, the_task)
            if held
            else None
        )
    prov = C.provenance(
        command=" ".join(["attnedit", "calibrate", *map(shlex.quote, sys.argv[2:])]) if len(sys.argv) > 1 else None,
        source_recipe=recipe if not Path(recipe).suffix else str(rec.source),
        model=name,
        model_hash=model_hash(name, cache_dir),
        task=task,
        split="train" if task else None,
        n_examples=len(examples),
        n_heldout=len(held),
        n_train=len(the_task.split("train")) if the_task else None,
        seed=seed,
        shots=shots,
        objective=objective,
        budget={"limit": limit, "max_candidates": max_candidates, "options": options},
        elapsed_s=round(time.time() - started, 1),
        calibrated_score=final,
        unpatched_score=unpatched,
        heldout=check,
        searches=searches,
    )
    resolved = resolved.replace(
        name=f"{rec.name or Path(str(rec.source)).stem}-calibrated" + (f"-{the_task.name}" if the_task else ""),
        model=name,
        provenance=prov,
        description=_description(resolved, rec, the_task, len(examples), objective),
    )
    header = f"attnedit apply {out} --model {name}\nCalibrated by: {prov.get('command') or 'attnedit calibrate'}"
    write_atomic(out, resolved.to_yaml(header=header))
    _summary(searches, final, unpatched, check, out, prov["elapsed_s"])


def _description(resolved, rec, the_task, n: int, objective: str) -> str:
    """One line for `attnedit ls`: what was calibrated, on what, from which recipe."""
    where = (
        f"{the_task.name} train ({n} examples, {objective})" if the_task is not None else "the model's own activations"
    )
    if not resolved.interventions:
        searched = ", ".join(dict.fromkeys(s.type for s in rec.interventions))
        source = rec.name or "a recipe"
        return f"{searched} calibrated on {where} from {source}: no candidate beat the unpatched model, nothing kept"
    methods = ", ".join(dict.fromkeys(s.type for s in resolved.interventions))
    return f"{methods} calibrated on {where} from {rec.name or 'a recipe'}"


def _options(pairs: list[str]) -> dict[str, str]:
    """{KEY: VALUE} of the --param pairs, as written (the methods' declarations type and check them)."""
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param {p!r}: write KEY=VALUE")
        out[key.strip()] = value
    return out


def _task(task, data_dir, limit, seed, rec):
    """(Task, calibration examples) or (None, []) when the recipe's searches need no task."""
    from attnedit.interventions import calibration as C  # noqa: PLC0415
    from attnedit.interventions import registry  # noqa: PLC0415

    if task is None:
        registry.check_task(rec.interventions, None, None)
        return None, []
    from attnedit.evals import load_task  # noqa: PLC0415

    the_task = load_task(task, data_dir=data_dir)
    registry.check_task(rec.interventions, task, the_task.kind, the_task.spec.states_context)
    return the_task, C.calibration_examples(the_task, limit, seed)


class _progress:
    """Progress of the searches on stderr: rich bars in a terminal, else a line every few seconds per search
    (label, done/total, rate, ETA); `progress(total, label)` starts one and returns its advance callable."""

    def __enter__(self):
        self.lines: list[Lines] = []
        self.bar = None
        if err_console.is_terminal:
            cols = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            self.bar = Progress(*cols, console=err_console, transient=False)
            self.bar.start()
        return self

    def __call__(self, total: int, label: str):
        if self.bar is not None:
            tid = self.bar.add_task(label, total=total)
            return lambda advance=1: self.bar.advance(tid, advance)
        for earlier in self.lines:
            earlier.close()  # a new search starts: the previous one's last line
        self.lines.append(Lines(label, total))
        return self.lines[-1].advance

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        for lines in self.lines:
            lines.close()


def readable(chosen, width: int = 70) -> str:
    """A search's choice in words: 'gamma=2; 12 heads in 5 layers (L3: 1,2; L5: 0; ...)', not a Python dict.

    Per-candidate scores are left out (the recipe's provenance keeps them)."""
    if not isinstance(chosen, dict):
        return str(chosen)
    parts = []
    for key, value in chosen.items():
        if key == "scores" or key.endswith("_scores"):
            continue
        if isinstance(value, dict) and value and all(isinstance(v, (list, tuple)) for v in value.values()):
            n = sum(len(v) for v in value.values())
            layers = "; ".join(f"L{layer}: {','.join(map(str, hs))}" for layer, hs in sorted(value.items()))
            shown = layers if len(layers) <= width else layers[: width - 3].rsplit(";", 1)[0] + "; ..."
            parts.append(f"{n} {key} in {len(value)} layer{'s' if len(value) != 1 else ''} ({shown})")
        elif isinstance(value, float):
            parts.append(f"{key}={value:g}")
        elif isinstance(value, (list, tuple)):
            text = ",".join(map(str, value))
            parts.append(f"{key}={text if len(text) <= width else text[: width - 3] + '...'}")
        elif isinstance(value, dict):
            parts.append(f"{key}: {len(value)} entries")
        else:
            parts.append(f"{key}={value}")
    return "; ".join(parts) or "-"


def _summary(searches: list[dict], final, unpatched, check, out: Path, elapsed: float) -> None:
    table = Table(title=f"calibrated recipe written to {out} ({elapsed:.0f} s)")
    for col in ("#", "method", "baseline", "candidates", "chosen"):
        table.add_column(col, overflow="fold")
    for s in searches:
        chosen = s.get("chosen") or ("kept as given" if not s["searched"] else s.get("why", "nothing kept"))
        base = s.get("baseline")
        table.add_row(
            "-" if s["index"] is None else str(s["index"]),
            s["method"],
            "-" if base is None else f"{base:.4f}",
            str(len(s.get("candidates", []))),
            readable(chosen),
        )
    show(table)
    if final is not None:
        console.print(f"calibration examples: unpatched {unpatched:.4f}, calibrated recipe {final:.4f}")
    elif unpatched is not None:
        console.print(f"calibration examples: unpatched {unpatched:.4f}; the recipe written is empty")
    if check is not None:
        line = (
            f"held-out examples ({check['n']}, {check['objective']}): "
            f"unpatched {check['baseline']:.4f}, calibrated recipe {check['calibrated']:.4f}"
        )
        if "metric" in check:
            line += f"; {check['metric']}: {check['metric_baseline']:.4f} -> {check['metric_calibrated']:.4f}"
        if check["calibrated"] < check["baseline"]:
            line += "  (worse than unpatched on held-out examples: the search overfitted)"
        console.print(line)
