"""attnedit eval: a recipe against the unpatched model on the same examples, with paired statistics."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from attnedit.files import slug

from .common import (
    BackendOpt,
    CacheOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    UsageError,
    check_device,
    check_folder_writable,
    check_seed,
    err_console,
    load_model,
    load_recipe,
    read_device_map,
    show,
    write_atomic,
)

COMMAND = "eval"
ORDER = 40


def run(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file or built-in recipe name.")],
    tasks: Annotated[
        str,
        typer.Option(
            "--tasks", "-t", help="Comma-separated tasks: built-in names, bigbench:<name or .json>, or task YAML files."
        ),
    ],
    model: ModelOpt = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Score the first N test examples of each task.")] = None,
    shots: Annotated[int, typer.Option(min=0, help="Demonstrations per example, drawn from the train split.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the demonstrations and of the bootstrap.")] = 0,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Rows per forward (left padded; scores do not depend on it).")
    ] = 8,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: attnedit-eval/<recipe>_<model>).")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Data folder of the built-in tasks (default: $ATTNEDIT_DATA_DIR).")
    ] = None,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat",
            help="Chat-template prompts (default: the task's setting, else if the tokenizer has one).",
        ),
    ] = None,
    plot: Annotated[bool, typer.Option("--plot", help="Also write DIR/differences.png.")] = False,
    bootstrap: Annotated[int, typer.Option(min=100, help="Bootstrap resamples for the 95% interval.")] = 10_000,
    force: Annotated[
        bool, typer.Option("--force", help="Discard what --out holds from an earlier run instead of resuming it.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print results.json instead of the table.")] = False,
    backend: BackendOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Score tasks with the unpatched and the patched model: metrics, difference with a 95% interval, McNemar's p,
    time, memory.

    Writes DIR/results.json and DIR/samples_<task>.jsonl; rerun the same command to resume an interrupted run.
    Under `accelerate launch -m attnedit.cli eval ...` the examples are shared among the processes.
    """
    from attnedit.evals import runner  # noqa: PLC0415
    from attnedit.evals.report import provenance, table  # noqa: PLC0415
    from attnedit.loading import DEFAULT_MODEL, load_config, model_hash  # noqa: PLC0415
    from attnedit.modelinfo import ModelInfo  # noqa: PLC0415

    check_seed(seed)
    check_device(device)
    rec = load_recipe(recipe)
    name = model or rec.model or DEFAULT_MODEL
    out = out or Path("attnedit-eval") / slug(f"{rec.name or Path(recipe).stem}_{Path(name).name}")
    _check_out(out)
    loaded = _load_tasks(tasks, data_dir, shots)
    config = load_config(name, cache_dir)
    rec.check_model(ModelInfo.from_config(config, name=name))  # before loading weights
    split = read_device_map(device_map, device, config)
    rank, world, barrier, dist_device = _processes()
    if split is not None and world > 1:
        raise UsageError("--device-map splits one model over devices; it does not combine with several processes")
    settings = runner.Settings(
        shots=shots, seed=seed, batch_size=batch_size, limit=limit, chat=chat, backend=backend, n_boot=bootstrap
    )
    settings.identity = {
        "model": name,
        "model_hash": model_hash(name, cache_dir),
        "recipe_hash": rec.hash(),
        "tasks": [t.name for t in loaded],
        "limit": limit,
        "shots": shots,
        "seed": seed,
        "batch_size": batch_size,
        "chat": chat,
        "backend": backend,
        "dtype": dtype,
        "data_dir": _data_dir_name(data_dir),
        "bootstrap": bootstrap,
    }
    if rank == 0:
        _prepare_out(out, force)
        runner.claim(out, settings.identity)
    if barrier is not None:
        barrier()
    m, tok = load_model(name, dtype, device or dist_device, cache_dir, device_map=split)
    results = runner.run_tasks(
        m, tok, rec, loaded, out, settings, rank=rank, world=world, progress=rank == 0, barrier=barrier
    )
    if results is None:
        return
    doc = provenance(
        command=" ".join(["attnedit", "eval", *map(shlex.quote, sys.argv[2:])]) if len(sys.argv) > 2 else None,
        model=name,
        model_hash=settings.identity["model_hash"],
        recipe_name=rec.name or recipe,  # an unnamed recipe: as the user named it
        recipe=rec.to_dict(),
        recipe_hash=rec.hash(),
        backend=_backend(rec, backend, m),
        device=str(next(m.parameters()).device),
        **({"device_map": _placement(m)} if split is not None else {}),
        dtype=str(next(m.parameters()).dtype),
        seed=seed,
        shots=shots,
        batch_size=batch_size,
        limit=limit,
        chat=chat,
        processes=world,
        bootstrap={"resamples": bootstrap, "seed": seed, "level": 0.95},
        tasks=results,
    )
    write_atomic(out / "results.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    if plot:
        from attnedit.evals.report import plot as draw  # noqa: PLC0415

        draw(doc, out / "differences.png")
    if as_json:
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return
    show(table(doc, f"{recipe} on {name} (backend {doc['backend']}, {shots}-shot, seed {seed})"))
    err_console.print(f"wrote {out / 'results.json'} and samples_<task>.jsonl")


def _load_tasks(arg: str, data_dir: Path | None, shots: int):
    """Every task, read and checked (files, rows, splits, shots) before any model is loaded."""
    from attnedit.evals import load_task  # noqa: PLC0415

    names = [n.strip() for n in arg.split(",") if n.strip()]
    if not names:
        raise UsageError("--tasks names no task")
    loaded = [load_task(n, data_dir) for n in names]
    seen = set()
    for task in loaded:
        if task.name in seen:
            raise UsageError(f"task {task.name!r} is named twice in --tasks")
        seen.add(task.name)
        train = len(task.split("train"))
        if shots > train:
            raise UsageError(f"--shots {shots} is larger than the train split of {task.name!r} ({train} examples)")
        if shots and task.kind == "pope":
            raise UsageError(f"task {task.name!r} is a pope task: those are zero-shot (use --shots 0)")
    return loaded


def _check_out(out: Path) -> None:
    """The output folder: not a file, and its nearest existing folder takes new files (checked before any work)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--out {out}: {existing} is a file, not a folder")
    check_folder_writable(existing, "--out")


def _prepare_out(out: Path, force: bool) -> None:
    from attnedit.evals import runner  # noqa: PLC0415

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if force and out.is_dir():
        runner.clear(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --out {out}: {e}") from None


def _processes():
    """(rank, world size, barrier, device) under `accelerate launch`; (0, 1, None, None) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        asked = _launch_processes()
        if asked > 1:
            err_console.print(
                f"[yellow]warning:[/] accelerate launch was asked for {asked} processes but started one "
                "(without GPUs it needs --multi_gpu: accelerate launch --multi_gpu --num_processes "
                f"{asked} ...; see docs/evals.md); running as one process",
                highlight=False,
                soft_wrap=True,
            )
        return 0, 1, None, None
    import torch  # noqa: PLC0415
    from accelerate import PartialState  # noqa: PLC0415

    state = PartialState(cpu=not torch.cuda.is_available())  # without a GPU: gloo processes on the CPU
    device = "cpu" if state.device.type == "cpu" else str(state.device)
    return state.process_index, state.num_processes, state.wait_for_everyone, device


def _launch_processes(cmdline: bytes | None = None) -> int:
    """The --num_processes that `accelerate launch` was given, when it started this process (else 1)."""
    if cmdline is None:
        if not any(k.startswith("ACCELERATE_") for k in os.environ):
            return 1
        try:
            cmdline = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
        except OSError:
            return 1
    args = [a.decode(errors="replace") for a in cmdline.split(b"\0")]
    if not any(a == "launch" or a.endswith(("accelerate-launch", "accelerate.commands.launch")) for a in args):
        return 1
    for i, arg in enumerate(args):
        value = args[i + 1] if arg in ("--num_processes", "--num-processes") and i + 1 < len(args) else None
        if arg.startswith(("--num_processes=", "--num-processes=")):
            value = arg.split("=", 1)[1]
        if value is not None and value.isdigit():
            return int(value)
    return 1


def _backend(rec, backend: str | None, model) -> str:
    from attnedit.kernels import choose  # noqa: PLC0415

    return choose(backend or rec.backend, next(model.parameters()).device)


def _placement(model) -> dict[str, str]:
    """Where a split model's modules went: module name -> device ("" -> one device when nothing was split)."""
    placed = getattr(model, "hf_device_map", None) or {"": next(model.parameters()).device}
    return {name: str(dev) for name, dev in placed.items()}


def _data_dir_name(data_dir: Path | None) -> str:
    raw = data_dir or os.environ.get("ATTNEDIT_DATA_DIR")
    return str(Path(raw).expanduser().resolve()) if raw else ""
