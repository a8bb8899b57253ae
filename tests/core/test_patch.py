"""The patcher on tiny models from real configs: identity, removal, caching, padding, batching."""

from __future__ import annotations

import models
import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import attnedit

ARCHS = models.TEXT_MODELS


def rel(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return ((a - b).norm() / b.norm()).item()


def recipe(text: str) -> attnedit.Recipe:
    return attnedit.Recipe.from_str(text, "test.yaml")


# Recipes whose every parameter leaves attention unchanged, but which run the table path.
IDENTITY_THROUGH_TABLES = [
    "interventions: [{type: zerotuning, gamma: 1.0}]",
    "interventions: [{type: act, beta: 1.0, layers: all}]",
    "interventions: [{type: pasta, alpha: 1.0}]",
    "interventions: [{type: zerotuning, gamma: 1.0}, {type: act, beta: 1.0, tau: 0.05, layers: all}]",
]

# Recipes whose key groups depend on position only: cached decoding must equal recomputation.
POSITIONAL = (
    "interventions:\n"
    "  - {type: zerotuning, gamma: 4.0, layers: '1:'}\n"
    "  - {type: pasta, alpha: 0.05, heads: {0: [0, 1], 2: all}}\n"
    "  - {type: head_prune, heads: {1: [0, 2]}}\n"
)


@pytest.mark.parametrize("arch", ARCHS)
def test_empty_recipe_is_exactly_unpatched(arch):
    model = models.tiny(arch)
    ids, mask = models.batch()
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
        with attnedit.patch(model, recipe("interventions: []")):
            out = model(ids, attention_mask=mask).logits
    assert torch.equal(out[mask.bool()], base[mask.bool()])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("text", IDENTITY_THROUGH_TABLES)
def test_identity_parameters_reproduce_logits(arch, text):
    model = models.tiny(arch)
    ids, mask = models.batch()
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
        with attnedit.patch(model, recipe(text), backend="reference") as p:
            assert p.compiled.layers, "the recipe must reach the table path"
            out = model(ids, attention_mask=mask).logits
    assert rel(out, base, mask) < 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_patch_changes_then_remove_restores(arch):
    model = models.tiny(arch)
    ids, mask = models.batch()
    original = model.config._attn_implementation
    with torch.no_grad():
        base = model(ids, attention_mask=mask).logits
        p = attnedit.patch(model, recipe(POSITIONAL)).apply()
        assert model.config.get_text_config()._attn_implementation == p.name
        assert p.name in AttentionInterface._global_mapping and p.name in AttentionMaskInterface._global_mapping
        patched = model(ids, attention_mask=mask).logits
        p.remove()
        after = model(ids, attention_mask=mask).logits
    assert rel(patched, base, mask) > 1e-3, "the recipe must change the model"
    assert torch.equal(after, base)
    assert model.config._attn_implementation == original
    assert p.name not in AttentionInterface._global_mapping and p.name not in AttentionMaskInterface._global_mapping


def test_remove_happens_when_the_body_raises():
    model = models.tiny("llama")
    with pytest.raises(RuntimeError, match="boom"):
        with attnedit.patch(model, recipe(POSITIONAL)):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_patches_do_not_nest():
    model = models.tiny("llama")
    with attnedit.patch(model, recipe(POSITIONAL)):
        with pytest.raises(attnedit.AttneditError, match="already patched"):
            attnedit.patch(model, recipe("interventions: []")).apply()


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_generation_equals_recomputation(arch):
    model = models.tiny(arch)
    ids, mask = models.batch(T=11, left_pad=(0, 3, 6))
    spans = [[(2, 6)], [(5, 9)], [(7, 10)]]
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad(), attnedit.patch(model, recipe(POSITIONAL), spans=spans):
        cached = model.generate(ids, use_cache=True, **kw)
        fresh = model.generate(ids, use_cache=False, **kw)
    # 12 new tokens cross Mistral's and Gemma3's sliding window of 8
    assert torch.equal(cached, fresh)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_left_padding_uses_each_rows_first_real_token(arch):
    """A padded row scores as the same row alone: the first token is the first real token."""
    model = models.tiny(arch)
    ids, mask = models.batch(left_pad=(0, 4, 7))
    r = recipe("interventions: [{type: zerotuning, gamma: 5.0}, {type: act, layers: all, tau: 0.05}]")
    with torch.no_grad(), attnedit.patch(model, r):
        padded = model(ids, attention_mask=mask).logits
        for b, n in enumerate((0, 4, 7)):
            alone = model(ids[b : b + 1, n:]).logits
            assert rel(padded[b, n:], alone[0]) < 1e-4


def test_batch_rows_are_independent():
    model = models.tiny("qwen2")
    ids, mask = models.batch(left_pad=(0, 0, 0))
    r = recipe("interventions: [{type: act, layers: all, tau: 0.05, beta: 0.2}]")
    with torch.no_grad(), attnedit.patch(model, r):
        together = model(ids).logits
        apart = torch.cat([model(ids[b : b + 1]).logits for b in range(3)])
    assert rel(together, apart) < 1e-5


def test_recipe_checked_against_the_model():
    model = models.tiny("llama")  # 4 layers, 8 heads
    with pytest.raises(attnedit.RecipeError, match=r"layer 9 does not exist.*0\.\.3"):
        attnedit.patch(model, recipe("interventions: [{type: zerotuning, gamma: 2, heads: {9: [1]}}]"))
    with pytest.raises(attnedit.RecipeError, match=r"heads \[8\] do not exist"):
        attnedit.patch(model, recipe("interventions: [{type: head_prune, heads: [8]}]"))
    with pytest.raises(attnedit.RecipeError, match="vision-language"):
        attnedit.patch(model, recipe("interventions: [{type: var}]"))


def test_unknown_backend_is_a_clear_error():
    model = models.tiny("llama")
    with pytest.raises(attnedit.BackendError, match="allowed: auto, reference, triton"):
        attnedit.patch(model, recipe("interventions: []"), backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal of a forced Triton backend")
def test_forced_triton_on_cpu_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = models.tiny("llama")
    ids, _ = models.batch(left_pad=(0, 0, 0))
    with attnedit.patch(model, recipe("interventions: [{type: zerotuning, gamma: 2}]"), backend="triton"):
        with pytest.raises(attnedit.BackendError, match="triton"):
            model(ids)


def test_cache_extent_follows_the_cache_object():
    """The layers' longest max_cache_len is kept per cache object: another cache (or more layers) is read anew."""

    class Layer:
        def __init__(self, n):
            self.max_cache_len = n

    class Cache:
        def __init__(self, *lengths, seen=0):
            self.layers = [Layer(n) for n in lengths]
            self.seen = seen

        def get_seq_length(self):
            return self.seen

    model = models.tiny("llama")
    p = attnedit.patch(model, attnedit.Recipe.from_str("interventions: [{type: zerotuning, gamma: 2.0}]"))
    small = Cache(0, 32)
    assert p._cache_extent(small, 5) == (0, 32)
    small.seen = 40
    assert p._cache_extent(small, 1) == (40, 41)
    big = Cache(128, 0, seen=3)
    assert p._cache_extent(big, 1) == (3, 128)
    big.layers.append(Layer(512))  # a layer made later
    assert p._cache_extent(big, 1) == (3, 512)
    assert p._cache_extent(None, 7) == (0, 7)
