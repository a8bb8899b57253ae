"""The patcher on the real default model (SmolLM2-135M-Instruct, fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

import attnedit

pytestmark = pytest.mark.slow


def _batch(tokenizer):
    tokenizer.padding_side = "left"
    texts = ["The capital of France is", "Review: a gorgeous, witty, seductive movie. Sentiment:"]
    return tokenizer(texts, return_tensors="pt", padding=True)


def _rel(a, b, mask):
    a, b = a[mask.bool()], b[mask.bool()]
    return ((a - b).norm() / b.norm()).item()


def test_identity_and_remove(smollm2):
    model, tok = smollm2
    enc = _batch(tok)
    with torch.no_grad():
        base = model(**enc).logits
        r = attnedit.Recipe.from_str("interventions: [{type: zerotuning, gamma: 1.0}, {type: act, beta: 1.0}]")
        with attnedit.patch(model, r, backend="reference"):
            same = model(**enc).logits
        changed_recipe = attnedit.Recipe.from_str("interventions: [{type: zerotuning, gamma: 3.0}, {type: act}]")
        with attnedit.patch(model, changed_recipe):
            changed = model(**enc).logits
        after = model(**enc).logits
    assert _rel(same, base, enc.attention_mask) < 1e-5
    assert _rel(changed, base, enc.attention_mask) > 1e-3
    assert torch.equal(after, base)


def test_cached_generation_equals_recomputation(smollm2):
    model, tok = smollm2
    enc = _batch(tok)
    r = attnedit.Recipe.from_str(
        "interventions: [{type: zerotuning, gamma: 2.5, layers: '4:'}, "
        "{type: head_prune, heads: {10: [1, 4], 20: [0]}}]"
    )
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad(), attnedit.patch(model, r):
        cached = model.generate(**enc, use_cache=True, **kw)
        fresh = model.generate(**enc, use_cache=False, **kw)
    assert torch.equal(cached, fresh)
