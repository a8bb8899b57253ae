"""What the CLI commands share: options, console, error handling, safe file writes."""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Callable

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from attnedit.errors import AttneditError, ModelLoadError
from attnedit.files import write_atomic
from attnedit.recipes import builtin_recipes, load_recipe, recipe_path

__all__ = ["builtin_recipes", "load_recipe", "recipe_path", "write_atomic"]  # shared by the commands

# Outside a terminal (a log, a pipe, CI) lines are never wrapped: a wrapped name or number reads wrong.
console = Console(soft_wrap=not sys.stdout.isatty())
err_console = Console(stderr=True, soft_wrap=not sys.stderr.isatty())

MODEL_HELP = "Alias (smollm2-135m-instruct), hub id, local model folder or .gguf file"


def model_option(default: str = "the recipe's `model`, else smollm2-135m-instruct", purpose: str = ""):
    """The --model/-m option of every command that takes a model; `purpose` and `default` say, in words,
    what the command does with it and what it uses without it (validate: the recipe's model, else none)."""
    return Annotated[str | None, typer.Option("--model", "-m", help=f"{purpose}{MODEL_HELP} (default: {default}).")]


ModelOpt = model_option()
DtypeOpt = Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16.")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1, ... (default: cuda if available).")]
BackendOpt = Annotated[
    str | None,
    typer.Option(help="auto (Triton on CUDA, reference elsewhere), triton or reference; default: the recipe's."),
]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        help="Split the model over devices: auto, balanced, balanced_low_0, sequential, or a JSON/YAML file "
        'mapping module names to devices ({"model.layers.15": 1, ...}).',
    ),
]
CacheOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir", help="Where converted models are cached (default $ATTNEDIT_CACHE or ~/.cache/attnedit)."
    ),
]


class UsageError(AttneditError):
    """Bad command-line input."""


def guard(fn: Callable) -> Callable:
    """Turn AttneditError into one red message and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AttneditError as e:
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


# ------------------------------------------------------------------ built-in recipes


def load_model(
    name: str, dtype: str = "auto", device: str | None = None, cache_dir: Path | None = None, device_map=None
):
    """Load a model with a status line; returns (model, tokenizer_or_processor)."""
    from attnedit.loading import load  # noqa: PLC0415

    with err_console.status(f"loading {name} ..."):
        return load(name, dtype=dtype, device=device, device_map=device_map, cache_dir=cache_dir)


def read_device_map(arg: str | None, device: str | None, config) -> str | dict | None:
    """--device-map: a strategy name, or a JSON/YAML file of module name -> device, checked against the model.

    Args:
        arg: the option's value (None: not given).
        device: the --device option (the two exclude each other).
        config: the model's config, to check the names of a mapping.
    Returns:
        None, the strategy name, or the mapping.
    Raises:
        UsageError: both options, a missing or unreadable file, a file that is no mapping, a bad entry.
    """
    from attnedit.loading import DEVICE_MAP_STRATEGIES, check_device_map  # noqa: PLC0415

    if arg is None:
        return None
    if device is not None:
        raise UsageError("give --device or --device-map, not both")
    path = Path(arg)
    if arg in DEVICE_MAP_STRATEGIES and not path.is_file():
        value: str | dict = arg
        where = f"--device-map {arg}"
    elif path.suffix.lower() in (".json", ".yaml", ".yml"):
        if not path.is_file():
            raise UsageError(f"--device-map file {path} does not exist")
        value = _mapping_file(path)
        where = f"--device-map {path}"
    else:
        raise UsageError(
            f"--device-map {arg!r} is neither {', '.join(DEVICE_MAP_STRATEGIES)} "
            "nor a .json/.yaml file mapping module names to devices"
        )
    try:
        check_device_map(value, config)
    except ModelLoadError as e:
        raise UsageError(f"{where}: {e}") from None
    return value


def _mapping_file(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML reads JSON too
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UsageError(f"--device-map {path}: cannot read it as JSON or YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data:
        raise UsageError(
            f"--device-map {path}: expected a mapping of module names to devices, "
            'e.g. {"model.embed_tokens": 0, "model.layers.0": 0, ..., "lm_head": 1}'
        )
    return data


# ------------------------------------------------------------------ safe writes


def check_writable(path: Path, force: bool, what: str = "--out") -> None:
    """Refuse an output file that exists (without force), is a folder, or whose folder cannot be written.

    Cheap, and run before any model loads; the write itself goes through `write_atomic`.
    """
    path = Path(path)
    if not str(path) or path.name in ("", ".", ".."):
        raise UsageError(f"{what} {str(path)!r} names no file")
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; give a file name")
    if path.exists() and not force:
        raise UsageError(f"{path} exists; pass --force to overwrite it")
    check_folder_writable(path.parent, what)


def check_folder_writable(folder: Path, what: str = "--out") -> None:
    """Refuse a folder that does not exist, is a file, or does not take a new file (read-only, /proc, /sys)."""
    folder = Path(folder)
    if not folder.exists():
        raise UsageError(f"folder {folder} does not exist ({what})")
    if not folder.is_dir():
        raise UsageError(f"{folder} is a file, not a folder ({what})")
    try:
        fd, probe = tempfile.mkstemp(prefix=".attnedit-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"cannot write into {folder} ({what}): {e.strerror or e}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_text_file(path: Path, what: str) -> str:
    """A user's text file, or a UsageError that says what is wrong with it (folder, device, binary, ...)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist")
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder, not a file")
    if not path.is_file():
        raise UsageError(f"{what} {path} is not a regular file (a device or a pipe)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path} is not UTF-8 text (a binary file?)") from None
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from None


def read_prompts(prompts: list[str] | None, prompts_file: Path | None) -> list[str]:
    """Prompts from --prompt (repeatable) and --prompts-file (one a line, or a JSONL of {"prompt": ...})."""
    out = list(prompts or [])
    for i, p in enumerate(out):
        if not p.strip():
            raise UsageError(f"--prompt number {i + 1} is empty")
    if prompts_file is not None:
        text = read_text_file(prompts_file, "prompts file")
        if "\x00" in text:
            raise UsageError(f"prompts file {prompts_file} holds NUL bytes (a binary file?)")
        import json  # noqa: PLC0415

        found = 0
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            found += 1
            if prompts_file.suffix == ".jsonl":
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{prompts_file}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                    raise UsageError(f"{prompts_file}:{n}: each line is an object with a non-empty string 'prompt'")
                out.append(row["prompt"])
            else:
                out.append(line)
        if not found:
            raise UsageError(f"prompts file {prompts_file} holds no prompt (it is empty)")
    if not out:
        raise UsageError("no prompt given: use --prompt TEXT (repeatable) or --prompts-file FILE")
    return out


def check_seed(seed: int) -> None:
    if seed < 0 or seed >= 2**32:
        raise UsageError(f"--seed {seed}: a seed is an integer from 0 to {2**32 - 1}")


def check_device(device: str | None) -> None:
    """--device checked before anything loads (`cuda` on a CPU-only torch, a GPU the machine lacks)."""
    if device is None:
        return
    from attnedit.loading import check_device as check  # noqa: PLC0415  (imports torch)

    check(device)


def show(table: Table) -> None:
    """Print a table: drawn with boxes in a terminal; elsewhere as a Markdown table (lm-eval's style) whose
    cells never wrap, so a log or CI shows each name and interval whole on its row."""
    if console.is_terminal:
        console.print(table)
        return
    print(markdown(table))


def markdown(table: Table) -> str:
    """A rich Table as Markdown: title line, header, one line per row, markup and line breaks removed."""

    def cell(value) -> str:
        text = value.plain if isinstance(value, Text) else Text.from_markup(str(value)).plain
        return " ".join(text.split()).replace("|", "\\|")

    columns = table.columns
    rows = list(zip(*(list(c.cells) for c in columns))) if columns else []
    right = {i for i, c in enumerate(columns) if c.justify == "right"}
    lines = [f"{cell(table.title)}", ""] if table.title else []
    lines.append("| " + " | ".join(cell(c.header) for c in columns) + " |")
    lines.append("|" + "|".join("---:" if i in right else "---" for i in range(len(columns))) + "|")
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    if table.caption:
        lines += ["", cell(table.caption)]
    return "\n".join(lines)


def stdout_is_tty() -> bool:
    return sys.stdout.isatty()
