"""Several processes (accelerate launch on the CPU, gloo): shards merge into the single-process results."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import evalkit
import pytest

RECIPE = "name: act-test\ninterventions: [{type: act, layers: '1:', tau: 0.05}]\n"


def _eval(prefix: list[str], recipe, model, tasks, out):
    cmd = prefix + [
        "-m",
        "attnedit.cli",
        "eval",
        str(recipe),
        "--model",
        str(model),
        "--tasks",
        tasks,
        "--batch-size",
        "3",
        "--bootstrap",
        "500",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


def test_two_processes_merge_to_the_single_process_results(tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate command is not installed")
    model = evalkit.save_tiny(tmp_path / "model")
    toy = evalkit.toy_task(tmp_path / "toy")
    recipe = tmp_path / "act.yaml"
    recipe.write_text(RECIPE)
    tasks = f"{toy},facts-conflict"
    one = _eval([sys.executable], recipe, model, tasks, tmp_path / "one")
    # accelerate's --cpu launcher starts one process (several need MPI); its torchrun launcher
    # (--multi_gpu) starts two, which run on the CPU with gloo when there is no GPU
    two = _eval(
        [
            accelerate,
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ],
        recipe,
        model,
        tasks,
        tmp_path / "two",
    )
    assert two["processes"] == 2 and one["processes"] == 1
    assert sorted(p.name for p in (tmp_path / "two/.work").glob("*.rank1.jsonl")) == [
        "facts-conflict.rank1.jsonl",
        "toy.rank1.jsonl",
    ]
    for name in one["tasks"]:
        for key in ("n", "baseline", "patched", "difference"):
            assert one["tasks"][name][key] == two["tasks"][name][key], (name, key)
        a = (tmp_path / "one" / f"samples_{name}.jsonl").read_text()
        assert a == (tmp_path / "two" / f"samples_{name}.jsonl").read_text()
