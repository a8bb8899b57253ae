"""Run the attnedit CLI, optionally pausing at one point of a write so that a test can SIGKILL it there.

KILLABLE_PAUSE names the point (unset: no pause); when the run reaches it, the file KILLABLE_MARK is
created and the process sleeps until it is killed.
  weights: the export's weights are in its `.partial` folder, the config not yet.
  swap:    an export with --force has moved the previous folder aside (`.old`), the new one not yet in.
  tmpfile: `write_atomic` has written its temporary file, not yet renamed it into place.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def _pause() -> None:
    Path(os.environ["KILLABLE_MARK"]).touch()
    time.sleep(600)


def _install(point: str) -> None:
    import importlib

    if point == "weights":
        exp = importlib.import_module("attnedit.export")
        write_config = exp._write_config

        def paused(*args, **kwargs):
            _pause()
            return write_config(*args, **kwargs)

        exp._write_config = paused
    elif point == "swap":
        rename = os.rename

        def paused_rename(src, dst, *args, **kwargs):
            rename(src, dst, *args, **kwargs)
            if str(dst).endswith(".old"):
                _pause()

        os.rename = paused_rename
    elif point == "tmpfile":
        replace = os.replace

        def paused_replace(src, dst, *args, **kwargs):
            if str(src).endswith(".tmp"):
                _pause()
            return replace(src, dst, *args, **kwargs)

        os.replace = paused_replace
    else:
        raise SystemExit(f"unknown KILLABLE_PAUSE {point!r}")


if __name__ == "__main__":
    if os.environ.get("KILLABLE_PAUSE"):
        _install(os.environ["KILLABLE_PAUSE"])
    from attnedit.cli.main import main

    main()
