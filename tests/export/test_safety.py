"""Writing safely: no overwrite without force, atomic replace, and a failure anywhere leaves the target as it was."""

from __future__ import annotations

import os

import models
import pytest
from export_kit import exp, recipe, tiny_tokenizer, tree

import attnedit
from attnedit.errors import AttneditError

MIXED = "interventions: [{type: head_prune, heads: {1: [0]}}, {type: zerotuning, gamma: 2.0}]"


@pytest.fixture(scope="module")
def model():
    return models.tiny("llama")


def run(model, out, **kw):
    return attnedit.export(model, recipe(MIXED), out, tokenizer=tiny_tokenizer(), **kw)


def old_folder(path):
    path.mkdir()
    (path / "keep.txt").write_text("precious")
    (path / "sub").mkdir()
    (path / "sub" / "x.bin").write_bytes(b"\x00\x01")
    return tree(path)


def test_non_empty_folder_is_refused_without_force(model, tmp_path):
    before = old_folder(tmp_path / "out")
    with pytest.raises(AttneditError, match="not empty; pass --force"):
        run(model, tmp_path / "out")
    assert tree(tmp_path / "out") == before
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_empty_folder_and_missing_folder_are_written(model, tmp_path):
    (tmp_path / "empty").mkdir()
    run(model, tmp_path / "empty")
    run(model, tmp_path / "new")
    for name in ("empty", "new"):
        assert {"config.json", "model.safetensors", "README.md", exp.FULL_RECIPE, exp.DYNAMIC_RECIPE} <= set(
            os.listdir(tmp_path / name)
        )
    assert sorted(os.listdir(tmp_path)) == ["empty", "new"]


def test_force_replaces_the_whole_folder(model, tmp_path):
    old_folder(tmp_path / "out")
    run(model, tmp_path / "out", force=True)
    names = set(os.listdir(tmp_path / "out"))
    assert "keep.txt" not in names and "sub" not in names and "config.json" in names
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary or old folder left beside it


@pytest.mark.parametrize("bad", ["file", "no_parent", "source"])
def test_bad_targets_are_refused(model, tmp_path, bad):
    if bad == "file":
        (tmp_path / "out").write_text("x")
        target, match = tmp_path / "out", "not a folder"
    elif bad == "no_parent":
        target, match = tmp_path / "missing" / "out", "does not exist"
    else:
        target, match = tmp_path / "src", "the folder the model was loaded from"
        model.save_pretrained(target)
    with pytest.raises(AttneditError, match=match):
        attnedit.export(
            model, recipe(MIXED), target, tokenizer=tiny_tokenizer(), force=True, base_model=str(tmp_path / "src")
        )


def _fail_in_weights(monkeypatch, model):
    real = type(model).save_pretrained

    def half(self, path, **kw):
        real(self, path, **kw)  # the weights are on disk, then it breaks
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", half)


def _fail_in_tokenizer(monkeypatch, model):
    from transformers import PreTrainedTokenizerFast

    monkeypatch.setattr(
        PreTrainedTokenizerFast, "save_pretrained", lambda self, path, **kw: (_ for _ in ()).throw(OSError("disk full"))
    )


def _fail_in_card(monkeypatch, model):
    from attnedit import card

    monkeypatch.setattr(card, "model_card", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))


def _fail_in_swap(monkeypatch, model):
    real = os.rename

    def rename(src, dst):
        if str(src).endswith(".partial"):
            raise OSError("rename failed")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", rename)


FAILURES = {"weights": _fail_in_weights, "tokenizer": _fail_in_tokenizer, "card": _fail_in_card, "swap": _fail_in_swap}


@pytest.mark.parametrize("stage", FAILURES)
@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_write_leaves_the_target_as_it_was(model, tmp_path, monkeypatch, stage, existing):
    before = old_folder(tmp_path / "out") if existing else None
    FAILURES[stage](monkeypatch, model)
    with pytest.raises((OSError, KeyboardInterrupt)):
        run(model, tmp_path / "out", force=True)
    monkeypatch.undo()
    if existing:
        assert tree(tmp_path / "out") == before
        assert sorted(os.listdir(tmp_path)) == ["out"]
    else:
        assert os.listdir(tmp_path) == []
