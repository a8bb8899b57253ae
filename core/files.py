"""Writing output files safely: never half-written, with the user's umask, stale temporaries cleaned."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from .errors import AttneditError


def slug(text: str) -> str:
    """`text` as a file name: letters, digits, '-', '_' and '.' kept, anything else '_'."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(path: Path) -> None:
    """Delete the temporary files of `path` that a killed process left (`.NAME.<pid>.<rand>.tmp`)."""
    path = Path(path)
    for old in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        pid = old.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            old.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write a file through a temporary name and rename it into place: never half-written.

    The file's mode follows the umask (as a file made by `open` would); temporary files that a
    killed run left for the same path are deleted first.
    """
    path = Path(path)
    if path.is_dir():
        raise AttneditError(f"{path} is a folder; cannot write a file there")
    clean_stale(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    except OSError as e:
        raise AttneditError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise AttneditError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
