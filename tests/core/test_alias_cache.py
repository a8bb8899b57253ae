"""The converted alias in the cache: its file hashes are recorded at conversion and checked at every load,
`model_hash` describes the weights read, and no export may write into the cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import models
import pytest
from typer.testing import CliRunner

import attnedit
from attnedit import loading
from attnedit.cli.main import app

ALIAS = "smollm2-135m-instruct"


@pytest.fixture
def cache(tmp_path, tiny_with_tokenizer):
    """A cache holding a converted 'alias' (a tiny model), sealed as a conversion seals it."""
    root = tmp_path / "cache"
    target = loading.alias_cache(ALIAS, root)
    target.parent.mkdir(parents=True)
    shutil.copytree(tiny_with_tokenizer, target)
    loading._seal(target, {"alias": ALIAS})
    return root, target


def test_a_sealed_cache_loads_and_its_hash_is_the_weights(cache):
    root, target = cache
    assert loading.alias_dir(ALIAS, root) == target
    model, _ = attnedit.load(ALIAS, cache_dir=root, device="cpu", dtype="float32")
    assert model.config.num_hidden_layers == 4
    assert loading.model_hash(ALIAS, root) == loading.model_hash(str(target))  # the weights read, not the GGUF
    assert loading.model_hash(ALIAS, root) != loading.ALIASES[ALIAS].sha256


def test_a_truncated_cache_is_named_with_what_to_delete(cache):
    root, target = cache
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for call in (lambda: attnedit.load(ALIAS, cache_dir=root, device="cpu"), lambda: loading.model_hash(ALIAS, root)):
        with pytest.raises(attnedit.ModelLoadError, match="damaged or was replaced") as err:
            call()
        assert f"rm -rf {target}" in str(err.value) and "model.safetensors" in str(err.value)


def test_replaced_weights_are_detected(cache):
    root, target = cache
    models.tiny("llama", seed=1).save_pretrained(target)  # same file names, other weights
    with pytest.raises(attnedit.ModelLoadError, match="damaged or was replaced"):
        attnedit.load(ALIAS, cache_dir=root, device="cpu")


def test_a_replaced_config_is_detected_without_reading_weights(cache):
    root, target = cache
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    with pytest.raises(attnedit.ModelLoadError, match="config.json differs"):
        loading.load_config(ALIAS, root)


def test_a_folder_put_in_place_of_the_conversion_is_refused(cache):
    root, target = cache
    (target / loading.SOURCE_FILE).unlink()  # what an export with --force into the cache left
    (target / "attnedit_recipe.yaml").write_text("interventions: []\n")
    with pytest.raises(attnedit.ModelLoadError, match="attnedit can verify"):
        attnedit.load(ALIAS, cache_dir=root, device="cpu")


def test_a_conversion_without_recorded_hashes_is_converted_again(cache, monkeypatch):
    root, target = cache
    (target / loading.SOURCE_FILE).write_text(json.dumps({"alias": ALIAS}))  # written before hashes were kept

    def convert(name):
        raise attnedit.ModelLoadError("converting again")

    monkeypatch.setattr(loading, "alias_file", convert)
    with pytest.raises(attnedit.ModelLoadError, match="converting again"):
        loading.alias_dir(ALIAS, root)
    assert not target.exists()


@pytest.mark.parametrize("where", ["cache", "inside", "root", "env"])
def test_an_export_into_the_cache_is_refused(cache, tiny_with_tokenizer, tmp_path, monkeypatch, where):
    root, target = cache
    out = {"cache": target, "inside": target / "sub", "root": root, "env": tmp_path / "envcache" / "x"}[where]
    args = ["export", "act-paper", "--model", str(tiny_with_tokenizer), "--out", str(out), "--force"]
    if where == "env":
        monkeypatch.setenv("ATTNEDIT_CACHE", str(tmp_path / "envcache"))
        (tmp_path / "envcache").mkdir()
    else:
        args += ["--cache-dir", str(root)]
    before = sorted(p.name for p in target.iterdir())
    loads = []
    monkeypatch.setattr(loading, "load", lambda *a, **k: loads.append(a))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "converted-model cache" in result.output and not loads
    assert sorted(p.name for p in target.iterdir()) == before
    model, tok = attnedit.load(str(tiny_with_tokenizer), device="cpu")
    with pytest.raises(attnedit.AttneditError, match="converted-model cache"):
        attnedit.export(model, attnedit.Recipe(), target, tokenizer=tok, force=True, cache_dir=root)


def test_a_killed_conversion_is_cleaned_by_the_next(tmp_path, monkeypatch):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    root = tmp_path / "cache"
    root.mkdir()
    stale = root / f".{ALIAS}-{proc.pid}-abc123"
    running = root / f".{ALIAS}-{os.getppid()}-abc123"
    for p in (stale, running):
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"x" * 100)

    def convert(name):
        raise attnedit.ModelLoadError("converting")

    monkeypatch.setattr(loading, "alias_file", convert)
    with pytest.raises(attnedit.ModelLoadError, match="converting"):
        loading.alias_dir(ALIAS, root)
    assert not stale.exists() and running.exists()
