"""Progress of long loops: a bar in a terminal; elsewhere (a log, CI) a line every few seconds.

Each line names the work, done/total, the rate and the time left, e.g.
``scoring sst2: 240/872 (12.3/s, ETA 0:51)``, and a last line when the work ends.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

EVERY_S = float(os.environ.get("ATTNEDIT_PROGRESS_EVERY", "10"))  # seconds between lines outside a terminal


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Lines:
    """Progress as plain lines on a stream: one every `every` seconds of work, and one at the end."""

    def __init__(self, label: str, total: int, every: float = EVERY_S, stream: TextIO | None = None):
        self.label, self.total, self.every = label, total, every
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = self.last = time.monotonic()
        self.closed = False

    def advance(self, advance: int = 1) -> None:
        self.done += advance
        now = time.monotonic()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            self._line(now)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line(time.monotonic(), final=True)

    def _line(self, now: float, final: bool = False) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        if final:
            tail = f"done in {_clock(elapsed)}"
        else:
            eta = (self.total - self.done) / rate if rate > 0 else float("nan")
            tail = f"ETA {_clock(eta)}" if eta == eta else "ETA ?"
        print(f"{self.label}: {self.done}/{self.total} ({rate:.1f}/s, {tail})", file=self.stream, flush=True)


@contextmanager
def bar(show: bool, total: int, label: str) -> Iterator[Callable[..., None]]:
    """An `advance(n=1)` callable: a transient rich bar on a terminal's stderr, progress lines elsewhere."""
    if not show:
        yield lambda n=1: None
        return
    if sys.stderr.isatty():
        from rich.console import Console  # noqa: PLC0415  (rich's progress: terminals only)
        from rich.progress import Progress  # noqa: PLC0415  (rich's progress: terminals only)

        with Progress(console=Console(stderr=True), transient=True) as progress:
            task = progress.add_task(label, total=total)
            yield lambda n=1: progress.advance(task, n)
        return
    lines = Lines(label, total)
    try:
        yield lines.advance
    finally:
        lines.close()
