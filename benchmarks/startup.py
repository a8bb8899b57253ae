"""Start-up time of the light commands: median wall time of each over several runs, in one table.

    python benchmarks/startup.py [--runs 7] [--out benchmarks/results/startup.md]

Each command runs in a fresh process from a scratch folder (what a user waits for at the prompt);
`import torch` alone is measured in the same run, for scale.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = [
    ("attnedit --version", ["--version"]),
    ("attnedit --help", ["--help"]),
    ("attnedit ls", ["ls"]),
    ("attnedit cp act-paper mine.yaml --force", ["cp", "act-paper", "mine.yaml", "--force"]),
    ("attnedit validate act-paper", ["validate", "act-paper"]),
    ("attnedit validate mine.yaml", ["validate", "mine.yaml"]),
]


def _time(argv: list[str], cwd: str, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=cwd, capture_output=True)
        out.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {done.stderr.decode()[-500:]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    exe = shutil.which("attnedit", path=os.path.dirname(sys.executable)) or "attnedit"
    rows = []
    with tempfile.TemporaryDirectory() as cwd:
        for label, argv in COMMANDS:
            rows.append((label, _time([exe, *argv], cwd, args.runs)))
        rows.append(
            ("python -c 'import torch' (for scale)", _time([sys.executable, "-c", "import torch"], cwd, args.runs))
        )
    lines = [
        f"Start-up of the light commands ({platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; {args.runs} runs each, fresh process per run)",
        "",
        "| command | median s | min s | max s |",
        "|---|---:|---:|---:|",
    ]
    for label, times in rows:
        lines.append(f"| `{label}` | {statistics.median(times):.2f} | {min(times):.2f} | {max(times):.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
