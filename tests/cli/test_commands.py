"""The CLI's own commands: ls, cp, validate, apply, inspect."""

from __future__ import annotations

import json

import models
import pytest
from typer.testing import CliRunner

from attnedit.cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama folder with a byte-level tokenizer and a chat template, loadable by name."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tkm
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny")
    models.tiny("llama").save_pretrained(path)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet()):
        if len(vocab) < 256:
            vocab[ch] = len(vocab)
    inner = Tokenizer(tkm.WordLevel(vocab, unk_token="<pad>"))
    inner.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=False), pre_tokenizers.Split("", "isolated")]
    )
    inner.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(path)
    return path


def test_ls_lists_builtins():
    result = runner.invoke(app, ["ls", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert {"act-paper"} <= {r["name"] for r in rows}
    assert all(r["description"] for r in rows)


def test_cp_copies_and_refuses_to_overwrite(tmp_path):
    target = tmp_path / "mine.yaml"
    assert runner.invoke(app, ["cp", "act-paper", str(target)]).exit_code == 0
    assert "type: act" in target.read_text()
    again = runner.invoke(app, ["cp", "act-paper", str(target)])
    assert again.exit_code == 2 and "--force" in again.output
    missing = runner.invoke(app, ["cp", "no-such", str(tmp_path / "x.yaml")])
    assert missing.exit_code == 2 and "act-paper" in missing.output


def test_validate_against_a_model_config(tiny_dir, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("interventions:\n  - type: act\n    heads: {7: [0]}\n")
    result = runner.invoke(app, ["validate", str(bad), "--model", str(tiny_dir)])
    assert result.exit_code == 2
    assert "bad.yaml:3" in result.output and "layer 7 does not exist" in result.output and "0..3" in result.output


def test_apply_json(tiny_dir, tmp_path):
    out = tmp_path / "gen.json"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "interventions:\n  - {type: zerotuning, gamma: 8.0}\n  - {type: head_prune, heads: {1: [0, 1, 2, 3]}}\n"
    )
    result = runner.invoke(
        app,
        [
            "apply",
            str(recipe),
            "--model",
            str(tiny_dir),
            "--prompt",
            "hello",
            "--prompt",
            "a longer prompt",
            "--max-new-tokens",
            "6",
            "--json",
            "--out",
            str(out),
            "--no-chat",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [g["prompt"] for g in data["generations"]] == ["hello", "a longer prompt"]
    assert data["recipe_hash"] and data["backend"] == "reference"
    assert any(g["unpatched"] != g["patched"] for g in data["generations"]), "the recipe must change some generation"


def test_apply_needs_a_prompt(tiny_dir):
    result = runner.invoke(app, ["apply", "act-paper", "--model", str(tiny_dir)])
    assert result.exit_code == 2 and "no prompt" in result.output


def test_inspect_writes_png_and_json(tiny_dir, tmp_path):
    png = tmp_path / "map.png"
    result = runner.invoke(
        app,
        [
            "inspect",
            "--model",
            str(tiny_dir),
            "--prompt",
            "some words here",
            "--recipe",
            "act-paper",
            "--png",
            str(png),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(result.stdout)
    assert len(report["unpatched"]) == 4 and len(report["patched"]) == 4
    head = report["unpatched"][2]["heads"][0]
    assert 0 <= head["first_mass"] <= 1 and 0 <= head["sink_mass"] <= 1


def test_inspect_without_model_uses_the_recipes(tiny_dir, tmp_path):
    """inspect's --model is the shared option: without it, the recipe's `model` is loaded (as apply does)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_dir}\ninterventions:\n  - {{type: zerotuning, gamma: 2.0}}\n")
    args = ["inspect", "-p", "some words", "--recipe", str(recipe), "--png", str(tmp_path / "m.png"), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == str(tiny_dir)


def test_every_model_option_is_the_shared_one():
    """Each command that takes --model declares it through `cli.common.model_option` (one text, one default)."""
    import typer.main

    from attnedit.cli.common import MODEL_HELP

    group = typer.main.get_command(app)
    found = {}
    for name, command in group.commands.items():
        for param in command.params:
            if "--model" in getattr(param, "opts", ()):
                found[name] = param
    assert {"apply", "calibrate", "eval", "export", "inspect", "validate"} <= set(found)
    for name, param in found.items():
        assert sorted(param.opts) == ["--model", "-m"] and param.default is None, name
        assert MODEL_HELP in param.help and "(default: the recipe's `model`, else " in param.help, name


def test_apply_reads_spans_for_a_method_that_declares_them(tiny_dir, tmp_path):
    """PASTA declares how prompts with spans are encoded: the markers are stripped, a bad span is one error."""
    recipe = tmp_path / "p.yaml"
    recipe.write_text("interventions:\n  - {type: pasta, alpha: 0.01, heads: {1: all}}\n")
    args = ["apply", str(recipe), "--model", str(tiny_dir), "--max-new-tokens", "3", "--json", "--no-chat"]
    result = runner.invoke(app, [*args, "--prompt", "hello <<a longer>> prompt"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["generations"]
    assert row["prompt"] == "hello <<a longer>> prompt"
    result = runner.invoke(app, [*args, "--prompt", "hello <<never closed"])
    assert result.exit_code == 2 and "is never closed" in result.output
