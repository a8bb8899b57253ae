"""`attnedit eval` end to end on a tiny model folder, and bad input failing before any model loads."""

from __future__ import annotations

import json

import evalkit
import pytest
from typer.testing import CliRunner

from attnedit.cli import eval as eval_cmd
from attnedit.cli.main import app

RECIPE = "name: zt\ninterventions: [{type: zerotuning, gamma: 3.0}]\n"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return evalkit.save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "zt.yaml"
    path.write_text(RECIPE)
    return path


def _invoke(*args):
    return CliRunner().invoke(app, ["eval", *map(str, args)])


def test_eval_writes_results_and_samples(tiny_dir, toy, recipe, tmp_path):
    out = tmp_path / "out"
    res = _invoke(
        recipe,
        "--model",
        tiny_dir,
        "--tasks",
        f"{toy},facts-conflict",
        "--limit",
        9,
        "--shots",
        1,
        "--batch-size",
        4,
        "--out",
        out,
        "--plot",
        "--bootstrap",
        1000,
    )
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "results.json").read_text())
    for key in (
        "model",
        "model_hash",
        "recipe",
        "recipe_hash",
        "backend",
        "versions",
        "seed",
        "batch_size",
        "padding_side",
        "date",
        "tasks",
    ):
        assert key in doc, key
    assert (
        doc["backend"] == "reference"
        and doc["padding_side"] == "left"
        and doc["recipe"]["interventions"][0]["gamma"] == 3.0
    )
    assert set(doc["tasks"]) == {"toy", "facts-conflict"}
    assert doc["tasks"]["facts-conflict"]["metric"] == "context_rate" and doc["tasks"]["toy"]["n"] == 9
    for name in ("toy", "facts-conflict"):
        rows = [json.loads(line) for line in (out / f"samples_{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 9 and {"prompt", "choices", "baseline", "patched"} <= set(rows[0])
    assert (out / "differences.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "McNemar" in res.output and "facts-c" in res.output
    again = _invoke(
        recipe,
        "--model",
        tiny_dir,
        "--tasks",
        f"{toy},facts-conflict",
        "--limit",
        9,
        "--shots",
        1,
        "--batch-size",
        4,
        "--out",
        out,
        "--bootstrap",
        1000,
        "--json",
    )
    assert again.exit_code == 0, again.output
    redo = json.loads((out / "results.json").read_text())
    assert redo["tasks"] == doc["tasks"]  # resumed from the finished work files: the same numbers
    other = _invoke(recipe, "--model", tiny_dir, "--tasks", str(toy), "--limit", 5, "--out", out)
    assert other.exit_code == 2 and "holds a run with other settings" in other.output


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command gets as far as loading weights."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(eval_cmd, "load_model", refuse)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tasks", "sst3"], "unknown task 'sst3'"),
        (["--tasks", "sst2", "--data-dir", "{empty}"], "data file not found: {empty}/fewshot/sst2/stsa.binary.test"),
        (["--tasks", "{toy}", "--shots", "30"], "--shots 30 is larger than the train split of 'toy' (24 examples)"),
        (["--tasks", "{toy},{toy}"], "named twice"),
        (["--tasks", " , "], "--tasks names no task"),
        (["--tasks", "nothere.yaml"], "task file nothere.yaml does not exist"),
    ],
)
def test_bad_input_fails_before_the_model_loads(args, message, toy, recipe, tmp_path, no_model):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a.replace("{toy}", str(toy)).replace("{empty}", str(empty)) for a in args]
    message = message.replace("{empty}", str(empty))
    res = _invoke(recipe, *args, "--out", tmp_path / "o")
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output


def test_malformed_row_and_empty_task_fail_before_the_model_loads(toy, recipe, tmp_path, no_model):
    (toy.parent / "test.jsonl").write_text('{"sentence": "good", "label": 1}\n{"sentence": "x", "label": "maybe"}\n')
    res = _invoke(recipe, "--tasks", toy, "--out", tmp_path / "o")
    assert res.exit_code == 2 and "test.jsonl:2: label 'maybe' is not one of ['0', '1']" in " ".join(res.output.split())
    (toy.parent / "test.jsonl").write_text("")
    res = _invoke(recipe, "--tasks", toy, "--out", tmp_path / "o")
    assert res.exit_code == 2 and "the test split is empty" in res.output


def test_recipe_that_does_not_fit_the_model_fails_before_loading(tiny_dir, toy, tmp_path, no_model):
    bad = tmp_path / "bad.yaml"
    bad.write_text("interventions: [{type: head_prune, heads: {40: [0]}}]\n")
    res = _invoke(bad, "--model", tiny_dir, "--tasks", toy, "--out", tmp_path / "o")
    assert res.exit_code == 2 and "layer 40 does not exist" in res.output
