"""Exported, then loaded: the same logits and the same greedy tokens as the patched model in memory (fp32)."""

from __future__ import annotations

import json

import models
import pytest
import torch
import vlm
from export_kit import recipe, rel, tiny_tokenizer, vlm_inputs
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import attnedit
from attnedit.modelinfo import ModelInfo

ARCHS = models.TEXT_MODELS
TOL = 1e-5

STATIC = "interventions:\n  - {type: head_prune, heads: {0: [1], 1: [0, 3], 3: [2]}}\n"


def mixed(head_dim: int) -> str:
    """Folded zero pruning with dynamic ZeroTuning, ACT and mean ablation (no o_proj bias) around it."""
    g = torch.Generator().manual_seed(3)
    means = {h: [round(float(x), 4) for x in torch.randn(head_dim, generator=g)] for h in (1, 2)}
    return (
        "interventions:\n"
        "  - {type: head_prune, heads: {1: [0, 3], 2: [0]}}\n"
        "  - {type: zerotuning, gamma: 3.0, layers: '1:'}\n"
        "  - {type: act, beta: 0.3, tau: 0.05, layers: all}\n"
        f"  - {{type: head_prune, ablation: mean, heads: {{2: [1, 2]}}, means: {{2: {json.dumps(means)}}}}}\n"
    )


def patched_outputs(model, rec, ids, mask, new_tokens=6):
    with torch.no_grad(), attnedit.patch(model, rec, backend="reference"):
        logits = model(ids, attention_mask=mask).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return logits, tokens


def outputs(model, ids, mask, new_tokens=6):
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return logits, tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_static_recipe_loads_with_plain_transformers(arch, tmp_path):
    model = models.tiny(arch)
    rec = recipe(STATIC)
    ids, mask = models.batch()
    base = outputs(model, ids, mask)[0]
    want_logits, want_tokens = patched_outputs(model, rec, ids, mask)
    result = attnedit.export(model, rec, tmp_path / "out", tokenizer=tiny_tokenizer())
    assert [e.folded for e in result.plan.edits] == [True]
    assert not (tmp_path / "out" / "attnedit_dynamic.yaml").exists()
    assert "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    logits, tokens = outputs(loaded, ids, mask)
    assert rel(logits, want_logits, mask) < TOL
    assert rel(base, want_logits, mask) > 1e-3  # the edit is visible, so the comparison means something
    assert torch.equal(tokens, want_tokens)
    assert torch.equal(outputs(model, ids, mask)[0], base)  # the model in memory is unchanged


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_recipe_loads_with_attnedit(arch, tmp_path):
    model = models.tiny(arch)
    rec = recipe(mixed(ModelInfo.from_config(model.config).head_dim))
    ids, mask = models.batch()
    want_logits, want_tokens = patched_outputs(model, rec, ids, mask)
    result = attnedit.export(model, rec, tmp_path / "out", tokenizer=tiny_tokenizer())
    assert [e.folded for e in result.plan.edits] == [True, False, False, False]
    loaded, tok = attnedit.load(str(tmp_path / "out"), dtype="float32", device="cpu")
    assert loaded.attnedit_patch.active
    assert loaded.attnedit_patch.recipe.interventions == rec.interventions[1:]
    loaded.attnedit_patch.backend = "reference"
    logits, tokens = outputs(loaded, ids, mask)
    assert rel(logits, want_logits, mask) < TOL
    assert torch.equal(tokens, want_tokens)
    loaded.attnedit_patch.remove()  # what is left is the folded part: what plain transformers loads
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert rel(outputs(loaded, ids, mask)[0], outputs(plain, ids, mask)[0], mask) < TOL
    loaded.attnedit_patch.apply()  # and back
    assert rel(outputs(loaded, ids, mask)[0], want_logits, mask) < TOL
    assert tok.pad_token == "<pad>"


def test_trust_remote_code_restores_dynamic_edits(tmp_path, hf_modules):
    model = models.tiny("llama")
    rec = recipe(mixed(16))
    ids, mask = models.batch()
    want_logits, want_tokens = patched_outputs(model, rec, ids, mask)
    attnedit.export(model, rec, tmp_path / "out", tokenizer=tiny_tokenizer())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "attnedit_entry.AttneditLoader"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True, dtype=torch.float32)
    assert type(loaded) is type(model) and loaded.attnedit_patch.active
    loaded.attnedit_patch.backend = "reference"
    logits, tokens = outputs(loaded, ids, mask)
    assert rel(logits, want_logits, mask) < TOL
    assert torch.equal(tokens, want_tokens)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert not hasattr(plain, "attnedit_patch")
    assert plain.config.attnedit["dynamic"][0]["type"] == "zerotuning"  # what transformers users can read


def test_mean_ablation_folds_into_an_o_proj_bias(tmp_path):
    model = models.tiny("llama", attention_bias=True)
    assert model.model.layers[2].self_attn.o_proj.bias is not None
    rec = recipe(
        mixed(16)
        .replace("{type: zerotuning, gamma: 3.0, layers: '1:'}", "{type: head_prune, heads: {3: [4]}}")
        .replace("  - {type: act, beta: 0.3, tau: 0.05, layers: all}\n", "")
    )
    ids, mask = models.batch()
    want_logits, want_tokens = patched_outputs(model, rec, ids, mask)
    result = attnedit.export(model, rec, tmp_path / "out", tokenizer=tiny_tokenizer())
    assert all(e.folded for e in result.plan.edits) and "bias" in result.plan.edits[-1].how
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    logits, tokens = outputs(loaded, ids, mask)
    assert rel(logits, want_logits, mask) < TOL
    assert torch.equal(tokens, want_tokens)


def test_tied_embeddings_and_shards(tmp_path):
    model = models.tiny("qwen2")
    assert model.config.tie_word_embeddings
    rec = recipe(STATIC)
    ids, mask = models.batch()
    want_logits, _ = patched_outputs(model, rec, ids, mask)
    attnedit.export(model, rec, tmp_path / "out", tokenizer=tiny_tokenizer(), max_shard_size="300KB")
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    keys = set()
    for shard in shards:
        with safe_open(shard, "pt") as f:
            keys |= set(f.keys())
    assert "lm_head.weight" not in keys  # tied: stored once
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert rel(outputs(loaded, ids, mask)[0], want_logits, mask) < TOL


@pytest.mark.parametrize("name", vlm.VLMS)
def test_vision_language_model_with_vhr(name, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaProcessor

    model, processor = vlm.tiny(name)
    rec = recipe("interventions: [{type: vhr, alpha: 1.5, layers: [1, 3], heads: [0, 2]}]")
    enc = vlm_inputs(processor, name)
    mask = enc.attention_mask
    with torch.no_grad():
        base = model(**enc).logits
        with attnedit.patch(model, rec, backend="reference"):
            want = model(**enc).logits
            want_tokens = model.generate(**enc, max_new_tokens=5, do_sample=False)
    result = attnedit.export(model, rec, tmp_path / "out", tokenizer=processor)
    assert result.plan.edits[0].folded
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        got = loaded(**enc).logits
        tokens = loaded.generate(**enc, max_new_tokens=5, do_sample=False)
    assert rel(got, want, mask) < TOL < rel(base, want, mask)
    assert torch.equal(tokens, want_tokens)
    if name == "llava":  # (the Qwen2-VL processor of tests/vlm.py is a test-only subclass without video support)
        reread = AutoProcessor.from_pretrained(tmp_path / "out")
        assert isinstance(reread, LlavaProcessor)
        enc2 = vlm_inputs(reread, name)
        assert torch.equal(enc2.input_ids, enc.input_ids) and torch.equal(enc2.pixel_values, enc.pixel_values)
        again, proc = attnedit.load(str(tmp_path / "out"), dtype="float32", device="cpu")
        assert isinstance(proc, LlavaProcessor) and not hasattr(again, "attnedit_patch")


def test_missing_dynamic_recipe_is_a_clear_load_error(tmp_path):
    attnedit.export(models.tiny("llama"), recipe(mixed(16)), tmp_path / "out", tokenizer=tiny_tokenizer())
    (tmp_path / "out" / "attnedit_dynamic.yaml").unlink()
    with pytest.raises(attnedit.ModelLoadError, match="attnedit_dynamic.yaml is missing"):
        attnedit.load(str(tmp_path / "out"), dtype="float32", device="cpu")
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # the folded part still loads
