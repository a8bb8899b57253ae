"""Adding a method: `first_bias` (tests/first_bias.py) declares itself once and works everywhere.

It composes an existing effect kind (a logit bias), and nothing outside its own module names it:
recipes, the patch, `attnedit eval`, the lm-eval model's batching, `attnedit ls --methods` and
`attnedit calibrate` (its search, its typed --param) all read its declaration.
"""

from __future__ import annotations

import json
import math

import evalkit
import first_bias
import pytest
import torch
import yaml
from typer.testing import CliRunner

import attnedit
from attnedit.cli.main import app
from attnedit.interventions import registry
from attnedit.recipe import Recipe


@pytest.fixture
def method():
    registry.register(first_bias.METHOD)
    yield first_bias.METHOD
    registry.unregister("first_bias")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return evalkit.save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_unknown_until_registered():
    with pytest.raises(attnedit.RecipeError, match="unknown type 'first_bias'"):
        Recipe.from_str("interventions: [{type: first_bias}]")


def test_the_patch_applies_it(method, tiny):
    model, tok = tiny
    enc = tok(["the film was good", "a story"], return_tensors="pt", padding=True)
    mine = Recipe.from_str(f"interventions: [{{type: first_bias, value: {math.log(3.0)}}}]")
    same = Recipe.from_str("interventions: [{type: zerotuning, gamma: 3.0}]")  # the same bias, another method
    with torch.no_grad():
        base = model(**enc).logits
        with attnedit.patch(model, mine, backend="reference"):
            got = model(**enc).logits
        with attnedit.patch(model, same, backend="reference"):
            want = model(**enc).logits
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, base, atol=1e-3)


def test_eval_and_the_lm_eval_batching_read_its_declaration(method, tiny_dir, toy, tmp_path):
    recipe = tmp_path / "fb.yaml"
    recipe.write_text("name: fb\ninterventions: [{type: first_bias, value: 2.0}]\n")
    res = _cli("eval", recipe, "--model", tiny_dir, "--tasks", toy, "--limit", 6, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["recipe"]["interventions"][0]["type"] == "first_bias" and doc["tasks"]["toy"]["n"] == 6
    harness = pytest.importorskip("attnedit.evals.harness", reason="lm-evaluation-harness is not installed")
    assert harness.per_input(Recipe.from_yaml(recipe)) == []  # batched as it is: no per-input detection
    both = Recipe.from_str("interventions: [{type: first_bias}, {type: act}]")
    assert harness.per_input(both) == ["act"]


def test_ls_lists_it(method):
    res = _cli("ls", "--methods", "--json")
    assert res.exit_code == 0, res.output
    (row,) = [r for r in json.loads(res.output) if r["name"] == "first_bias"]
    assert row["summary"] == method.summary and row["effects"] == ["Bias"] and row["export"] == "stays dynamic"
    assert row["params"] == ["values: a comma-separated list of numbers >= -20 and <= 20 (default -1,1)"]


def test_calibrate_checks_its_params_before_any_model_loads(method, tmp_path):
    recipe = tmp_path / "fb.yaml"
    recipe.write_text("interventions: [{type: first_bias}]\n")
    missing = tmp_path / "no-such-model"  # loading it would fail with another message
    for param, says in (
        ("nosuch=1", "no search of this recipe takes 'nosuch'; allowed: first_bias: values"),
        ("values=1,abc", "values (first_bias: the grid of biases) is a comma-separated list"),
    ):
        res = _cli("calibrate", recipe, "--model", missing, "--param", param, "--out", tmp_path / "c.yaml")
        assert res.exit_code == 2 and says in res.output and "Traceback" not in res.output, res.output
    res = _cli("calibrate", recipe, "--model", missing, "--out", tmp_path / "c.yaml")
    assert res.exit_code == 2 and "calibrating first_bias needs --task: a classification" in res.output


def test_calibrate_runs_its_search(method, tiny_dir, toy, tmp_path):
    recipe = tmp_path / "fb.yaml"
    recipe.write_text("interventions: [{type: first_bias}]\n")
    out = tmp_path / "c.yaml"
    args = ("--model", tiny_dir, "--task", toy, "--limit", 16, "--holdout", 0, "--param", "values=-2,0.5,3")
    res = _cli("calibrate", recipe, *args, "--out", out)
    assert res.exit_code == 0, res.output
    doc = yaml.safe_load(out.read_text())
    (search,) = doc["provenance"]["searches"]
    assert search["method"] == "first_bias" and [c["candidate"]["value"] for c in search["candidates"]] == [-2, 0.5, 3]
    assert doc["provenance"]["budget"]["options"] == {"values": [-2.0, 0.5, 3.0]}
    kept = doc["interventions"]
    assert kept == [] or (kept[0]["type"] == "first_bias" and kept[0]["value"] in (-2, 0.5, 3))
