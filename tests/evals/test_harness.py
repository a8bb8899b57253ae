"""lm-evaluation-harness: the `attnedit` model type runs a local lm-eval task, patched or not."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import evalkit
import pytest

import attnedit
from attnedit.evals import load_task, metric, score

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-evaluation-harness is not installed (pip install 'attnedit[lm-eval]')"
)

LM_TASK = """\
task: toy_attnedit
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
test_split: test
output_type: multiple_choice
doc_to_text: "review : {{{{sentence}}}} sentiment :"
doc_to_target: label
doc_to_choice: ["bad", "good"]
metric_list:
  - metric: acc
"""
RECIPES = {
    "zt": "interventions: [{type: zerotuning, gamma: 3.0}]\n",
    "act": "interventions: [{type: act, layers: '1:', tau: 0.05}]\n",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    model_dir = evalkit.save_tiny(root / "model")
    toy = evalkit.toy_task(root / "toy")
    tasks = root / "lm_tasks"
    tasks.mkdir()
    (tasks / "toy_attnedit.yaml").write_text(LM_TASK.format(test=toy.parent / "test.jsonl"))
    for name, text in RECIPES.items():
        (root / f"{name}.yaml").write_text(text)
    return root, model_dir, toy, tasks


@pytest.fixture(scope="module")
def manager(setup):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(setup[3]))  # indexing lm-eval's own tasks takes a while: once


def _lm_eval_acc(model_dir, manager, recipe=None, batch_size=4) -> float:
    from lm_eval import simple_evaluate

    import attnedit.evals.harness  # noqa: F401  (registers the model type)

    args = f"pretrained={model_dir},dtype=float32,device=cpu,batch_size={batch_size}" + (
        f",recipe={recipe}" if recipe else ""
    )
    out = simple_evaluate(model="attnedit", model_args=args, tasks=["toy_attnedit"], task_manager=manager)
    return out["results"]["toy_attnedit"]["acc,none"]


@pytest.mark.parametrize("recipe", [None, "zt", "act"])
def test_lm_eval_accuracy_equals_attnedit_scoring(setup, manager, recipe, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    root, model_dir, toy, tasks = setup
    rec_path = root / f"{recipe}.yaml" if recipe else None
    acc = _lm_eval_acc(model_dir, manager, rec_path)
    model, tok = attnedit.load(str(model_dir), dtype="float32", device="cpu")
    task = load_task(str(toy))
    rec = attnedit.Recipe.from_yaml(rec_path) if recipe else None
    ours = metric(score(model, tok, task, task.split("test"), recipe=rec, batch_size=1, progress=False), task)[
        "accuracy"
    ]
    assert acc == pytest.approx(ours)


def test_the_command_line_registers_the_model(setup, tmp_path):
    root, model_dir, _, tasks = setup
    command = shutil.which("attnedit-lm-eval", path=os.path.dirname(sys.executable))
    if command is None:
        pytest.skip("the attnedit-lm-eval command is not installed (pip install -e .)")
    cmd = [
        command,
        "run",
        "--model",
        "attnedit",
        "--device",
        "cpu",
        "--model_args",
        f"pretrained={model_dir},recipe={root / 'zt.yaml'}",
        "--tasks",
        "toy_attnedit",
        "--include_path",
        str(tasks),
        "--limit",
        "6",
        "--output_path",
        str(tmp_path / "lm"),
    ]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "toy_attnedit" in done.stdout and "acc" in done.stdout
