"""The decode kernels read a static cache's query position from the device, also as a custom operator."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_decode_reads_the_query_position_from_the_device():
    worker = Path(__file__).with_name("position_worker.py")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(worker)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    err = json.loads(done.stdout.strip().splitlines()[-1])
    for how in ("int", "tensor", "operator", "compiled", "dispatched"):
        assert err[how] < 1e-5, f"{how}: {err[how]}"
