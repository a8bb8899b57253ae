"""A static cache's prefill without padding: transformers passes no mask while the keys are the cache's
full length; patched generation must still equal dynamic-cache generation."""

from __future__ import annotations

import models
import pytest
import torch

import attnedit

RECIPES = {
    "zerotuning": "interventions: [{type: zerotuning, gamma: 4.0}]",
    "act": "interventions: [{type: act, layers: all, tau: 0.05, beta: 0.2}]",
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_static_cache_without_padding_equals_dynamic(name):
    model = models.tiny("llama")
    ids, _ = models.batch(T=11, left_pad=(0, 0, 0))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(ids, **kw)
        with attnedit.patch(model, attnedit.Recipe.from_str(RECIPES[name], "test.yaml")):
            dynamic = model.generate(ids, **kw)
            static = model.generate(ids, cache_implementation="static", **kw)
    assert not torch.equal(dynamic, plain), "the recipe must change the generated tokens"
    assert torch.equal(static, dynamic)
