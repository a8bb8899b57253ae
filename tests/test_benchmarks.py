"""The benchmark scripts run (a smoke run on the CPU; their figures come from the real runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_decode_host_benchmark_prints_its_table(tmp_path):
    """`benchmarks/decode_host.py` on a 4-layer model: a row per variant, one launch per patched layer."""
    pytest.importorskip("triton")
    out = tmp_path / "host.md"
    argv = [sys.executable, "benchmarks/decode_host.py", "--layers", "4", "--prompt", "64", "--repeats", "1"]
    argv += ["--variants", "sdpa,zerotuning,head_prune", "--out", str(out)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.read_text().splitlines() if line[:2] == "| "}
    assert set(rows) >= {"sdpa", "zerotuning", "head_prune"}
    assert rows["sdpa"][3].strip() == "1.00" and rows["sdpa"][6].strip() == "0"
    assert rows["zerotuning"][6].strip() == "4"  # every layer patched, one decode kernel each (short cache)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--variants", "zerotuning"], "--variants must start with sdpa"),
        (["--layers", "2"], "--layers must be at least 4"),
        (["--out", "no/such/folder/host.md"], "does not exist"),
    ],
)
def test_decode_host_benchmark_refuses_bad_options(extra, message):
    done = subprocess.run(
        [sys.executable, "benchmarks/decode_host.py", *extra], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr
