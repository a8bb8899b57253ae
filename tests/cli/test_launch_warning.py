"""`accelerate launch --num_processes 2` that starts one process (on a machine without GPUs, without
--multi_gpu) is found from the launcher's command line, so `attnedit eval` can say so."""

from __future__ import annotations

import pytest

from attnedit.cli.eval import _launch_processes


@pytest.mark.parametrize(
    "argv, asked",
    [
        (["/venv/bin/python", "/venv/bin/accelerate", "launch", "--num_processes", "2", "-m", "attnedit.cli"], 2),
        (["python", "-m", "accelerate.commands.launch", "--num_processes=4", "-m", "attnedit.cli"], 4),
        (["/venv/bin/accelerate-launch", "--num-processes", "3", "x.py"], 3),
        (["accelerate", "launch", "-m", "attnedit.cli", "eval"], 1),
        (["bash", "-c", "attnedit eval --num_processes 2"], 1),
    ],
)
def test_processes_asked_of_accelerate(argv, asked):
    assert _launch_processes("\0".join(argv).encode() + b"\0") == asked
