"""Export round trips on the real default model (SmolLM2-135M-Instruct, fp32, CPU, tied embeddings)."""

from __future__ import annotations

import json

import pytest
import torch
from export_kit import recipe, rel
from transformers import AutoModelForCausalLM

import attnedit
from attnedit.loading import model_hash

pytestmark = pytest.mark.slow

STATIC = "interventions: [{type: head_prune, heads: {3: [1, 4], 12: [0], 20: [3, 8]}}]"
MIXED = (
    "interventions:\n"
    "  - {type: head_prune, heads: {3: [1, 4], 12: [0], 20: [3, 8]}}\n"
    "  - {type: zerotuning, gamma: 2.0, layers: '10:'}\n"
    "  - {type: act}\n"
)


def _batch(tokenizer):
    tokenizer.padding_side = "left"
    texts = ["The capital of France is", "Review: a gorgeous, witty, seductive movie. Sentiment:"]
    return tokenizer(texts, return_tensors="pt", padding=True)


def _run(model, enc, tokenizer):
    with torch.no_grad():
        logits = model(**enc).logits
        tokens = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return logits, tokens


def _patched(model, rec, enc, tokenizer):
    with attnedit.patch(model, rec, backend="reference"):
        return _run(model, enc, tokenizer)


def test_static_recipe_by_plain_transformers(smollm2, tmp_path):
    model, tok = smollm2
    enc = _batch(tok)
    rec = recipe(STATIC)
    want_logits, want_tokens = _patched(model, rec, enc, tok)
    attnedit.export(model, rec, tmp_path / "out", tokenizer=tok)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["attnedit"]["base_model_hash"] == model_hash("smollm2-135m-instruct")
    assert config["tie_word_embeddings"] and "auto_map" not in config
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    logits, tokens = _run(loaded, enc, tok)
    assert rel(logits, want_logits, enc.attention_mask) < 1e-5
    assert torch.equal(tokens, want_tokens)


def test_mixed_recipe_by_attnedit_load(smollm2, tmp_path):
    model, tok = smollm2
    enc = _batch(tok)
    rec = recipe(MIXED)
    want_logits, want_tokens = _patched(model, rec, enc, tok)
    result = attnedit.export(model, rec, tmp_path / "out")  # tokenizer from the alias's folder
    assert [e.folded for e in result.plan.edits] == [True, False, False]
    loaded, tok2 = attnedit.load(str(tmp_path / "out"), dtype="float32", device="cpu")
    loaded.attnedit_patch.backend = "reference"
    enc2 = _batch(tok2)
    assert torch.equal(enc2.input_ids, enc.input_ids)
    logits, tokens = _run(loaded, enc2, tok2)
    assert rel(logits, want_logits, enc.attention_mask) < 1e-5
    assert torch.equal(tokens, want_tokens)
