"""The model card and config block: base model and hash, recipe, folded and dynamic lists, eval results."""

from __future__ import annotations

import json
import re

import models
import pytest
import yaml
from export_kit import exp, recipe, tiny_tokenizer

import attnedit
from attnedit.errors import AttneditError
from attnedit.loading import model_hash

MIXED = (
    "name: prune-and-tune\n"
    "interventions: [{type: head_prune, heads: {1: [0, 2]}}, {type: zerotuning, gamma: 2.0, layers: '2:'}]"
)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama folder with its tokenizer: a model with a name and a hash."""
    path = tmp_path_factory.mktemp("base")
    models.tiny("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_card_and_config_describe_the_export(base_dir, tmp_path):
    model, _ = attnedit.load(str(base_dir), dtype="float32", device="cpu")
    rec = recipe(MIXED)
    attnedit.export(model, rec, tmp_path / "out")  # the tokenizer comes from the base folder
    card = (tmp_path / "out" / "README.md").read_text()
    digest = model_hash(str(base_dir))
    assert f"| name | {base_dir} |" in card and digest in card
    assert re.search(r"\| 0 \| head_prune \| 1 \| 2 \| folded: output scale 0 on 2 heads", card)
    assert re.search(r"\| 1 \| zerotuning \| 2 \| 16 \| dynamic: logit bias", card)
    assert "need attnedit" in card and "trust_remote_code=True" in card
    assert f"| attnedit | {attnedit.__version__} |" in card
    block = re.search(r"```yaml\n(.*?)```", card, re.S).group(1)
    assert yaml.safe_load(block) == rec.to_dict()
    config = json.loads((tmp_path / "out" / "config.json").read_text())["attnedit"]
    assert config["base_model"] == str(base_dir) and config["base_model_hash"] == digest
    assert config["recipe_hash"] == rec.hash()
    assert [d["type"] for d in config["folded"]] == ["head_prune"] and [d["type"] for d in config["dynamic"]] == [
        "zerotuning"
    ]
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_static_card_says_everything_is_folded(tmp_path):
    attnedit.export(
        models.tiny("llama"),
        recipe("interventions: [{type: head_prune, heads: {1: [0]}}]"),
        tmp_path / "out",
        tokenizer=tiny_tokenizer(),
    )
    card = (tmp_path / "out" / "README.md").read_text()
    assert "need attnedit" not in card and "trust_remote_code" not in card
    assert "(unnamed: built in memory)" in card
    assert json.loads((tmp_path / "out" / "config.json").read_text())["attnedit"]["dynamic_recipe"] is None


RESULTS = {
    "eval": {  # the shape of attnedit eval's results.json
        "model": "m",
        "recipe_name": "r",
        "versions": {"torch": "x"},
        "tasks": {
            "sst2": {
                "kind": "choice",
                "metric": "accuracy",
                "n": 200,
                "baseline": {"value": 0.5},
                "patched": {"value": 0.625},
                "difference": {"value": 0.125, "ci95": [0.05, 0.2], "mcnemar": {"p": 0.0031}},
                "spec": {"name": "sst2"},
            }
        },
    },
    "tasks": {"model": "m", "results": {"sst2": {"accuracy": {"base": 0.5, "patched": 0.625}, "n": 200}}},
    "rows": {
        "recipe": "r",
        "rows": [{"task": "sst2", "metric": "accuracy", "base": 0.5, "patched": 0.625, "ci": [0.01, 0.2]}],
    },
}


@pytest.mark.parametrize("form", RESULTS)
def test_results_table_in_the_card(tmp_path, form):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(RESULTS[form]))
    attnedit.export(models.tiny("llama"), recipe(MIXED), tmp_path / "out", tokenizer=tiny_tokenizer(), results=path)
    card = (tmp_path / "out" / "README.md").read_text()
    section = card.split("## Evaluation", 1)[1].split("## Provenance", 1)[0]
    assert "| sst2 |" in section and "0.625" in section
    if form == "eval":
        assert "| task | n | metric | baseline | patched | difference | 95% CI | McNemar p |" in section
        assert "| sst2 | 200 | accuracy | 0.5 | 0.625 | +0.125 | [+0.05, +0.2] | 0.0031 |" in section
        assert "- recipe_name: r" in section and "spec" not in section
    elif form == "tasks":
        assert "accuracy.patched" in section and "- model: m" in section
    else:
        assert "| task | metric | base | patched | ci |" in section and "[0.01, 0.2]" in section
    assert (tmp_path / "out" / exp.RESULTS_FILE).read_bytes() == path.read_bytes()
    assert "measured with" not in section  # no hashes to compare


def test_results_of_another_recipe_are_flagged(tmp_path):
    path = tmp_path / "results.json"
    data = {**RESULTS["eval"], "recipe_hash": recipe(MIXED).hash()}
    path.write_text(json.dumps(data))
    attnedit.export(models.tiny("llama"), recipe(MIXED), tmp_path / "same", tokenizer=tiny_tokenizer(), results=path)
    assert "measured with" not in (tmp_path / "same" / "README.md").read_text()
    path.write_text(json.dumps({**data, "recipe_hash": "0" * 64}))
    attnedit.export(models.tiny("llama"), recipe(MIXED), tmp_path / "other", tokenizer=tiny_tokenizer(), results=path)
    assert "measured with another recipe" in (tmp_path / "other" / "README.md").read_text()


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not valid JSON"),
        ('{"model": "m"}', "expected an object whose 'rows'"),
        ('{"rows": []}', "'rows' is empty"),
        (None, "cannot read"),
    ],
)
def test_unreadable_results_are_refused_before_writing(tmp_path, text, match):
    path = tmp_path / "results.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(AttneditError, match=match):
        attnedit.export(models.tiny("llama"), recipe(MIXED), tmp_path / "out", tokenizer=tiny_tokenizer(), results=path)
    assert not (tmp_path / "out").exists()


def test_unnamed_model_needs_a_tokenizer(tmp_path):
    with pytest.raises(AttneditError, match="pass tokenizer="):
        attnedit.export(models.tiny("llama"), recipe(MIXED), tmp_path / "out")
    assert not (tmp_path / "out").exists()
