"""The `attnedit` command: one module per subcommand in this package, found by its COMMAND name."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Annotated

import typer
from typer import rich_utils

from . import common

app = typer.Typer(
    name="attnedit",
    help="Training-free attention interventions for Hugging Face checkpoints: apply, eval, calibrate, export.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _commands():
    """Subcommand modules define COMMAND (its name), ORDER (its place in --help) and run()."""
    found = []
    for info in pkgutil.iter_modules(importlib.import_module("attnedit.cli").__path__):
        if info.name.startswith("_") or info.name in ("main", "common"):
            continue
        module = importlib.import_module(f"attnedit.cli.{info.name}")
        if hasattr(module, "COMMAND") and hasattr(module, "run"):
            found.append(module)
    return sorted(found, key=lambda m: (getattr(m, "ORDER", 100), m.COMMAND))


def _version(value: bool) -> None:
    if value:
        from attnedit import __version__  # noqa: PLC0415  (only when asked)

        typer.echo(f"attnedit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Training-free attention interventions for Hugging Face checkpoints: apply, eval, calibrate, export."""


for _module in _commands():
    app.command(_module.COMMAND, help=_module.run.__doc__)(common.guard(_module.run))


def main() -> None:
    if not sys.stdout.isatty() and rich_utils.MAX_WIDTH is None:
        rich_utils.MAX_WIDTH = 160  # outside a terminal, --help is not cut at 80 columns (defaults stay whole)
    app()


if __name__ == "__main__":
    main()
