"""`attnedit export RECIPE --model M --out DIR`: writes, refuses, replaces with --force."""

from __future__ import annotations

import json

import models
import pytest
import torch
from export_kit import recipe, rel, tiny_tokenizer
from typer.testing import CliRunner

import attnedit
from attnedit.cli.main import app

runner = CliRunner()
MIXED = (
    "name: cli-mixed\ninterventions:\n  - {type: head_prune, heads: {1: [0, 2]}}\n  - {type: zerotuning, gamma: 2.0}\n"
)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    models.tiny("mistral").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def export(base_dir, rec_path, out, *extra):
    args = [
        "export",
        str(rec_path),
        "--model",
        str(base_dir),
        "--out",
        str(out),
        "--dtype",
        "float32",
        "--device",
        "cpu",
        *extra,
    ]
    return runner.invoke(app, args)


def test_export_command_writes_a_loadable_folder(base_dir, tmp_path):
    rec_path = tmp_path / "recipe.yaml"
    rec_path.write_text(MIXED)
    result = export(base_dir, rec_path, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "folded: output scale 0 on 2 heads" in result.stdout and "dynamic: logit bias" in result.stdout
    assert "trust_remote_code" in result.stdout
    base, _ = attnedit.load(str(base_dir), dtype="float32", device="cpu")
    ids, mask = models.batch()
    with torch.no_grad(), attnedit.patch(base, recipe(MIXED), backend="reference"):
        want = base(ids, attention_mask=mask).logits
    loaded, _ = attnedit.load(str(tmp_path / "out"), dtype="float32", device="cpu")
    loaded.attnedit_patch.backend = "reference"
    with torch.no_grad():
        assert rel(loaded(ids, attention_mask=mask).logits, want, mask) < 1e-5
    assert json.loads((tmp_path / "out" / "config.json").read_text())["attnedit"]["base_model"] == str(base_dir)


def test_export_command_refuses_and_forces(base_dir, tmp_path):
    rec_path = tmp_path / "recipe.yaml"
    rec_path.write_text(MIXED)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    refused = export(base_dir, rec_path, tmp_path / "out")
    assert refused.exit_code == 2 and "not empty; pass --force" in refused.stderr
    assert (tmp_path / "out" / "old.txt").read_text() == "x"
    bad = tmp_path / "results.json"
    bad.write_text("[1, 2]")
    refused = export(base_dir, rec_path, tmp_path / "out", "--force", "--results", str(bad))
    assert refused.exit_code == 2 and "results file" in refused.stderr and "Traceback" not in refused.output
    assert (tmp_path / "out" / "old.txt").read_text() == "x"
    forced = export(base_dir, rec_path, tmp_path / "out", "--force")
    assert forced.exit_code == 0, forced.output
    assert not (tmp_path / "out" / "old.txt").exists() and (tmp_path / "out" / "model.safetensors").is_file()


def test_export_command_checks_the_recipe_before_loading(base_dir, tmp_path):
    rec_path = tmp_path / "recipe.yaml"
    rec_path.write_text("interventions: [{type: head_prune, heads: {9: [0]}}]")
    result = export(base_dir, rec_path, tmp_path / "out")
    assert result.exit_code == 2 and "layer 9 does not exist" in result.stderr
    assert not (tmp_path / "out").exists()
