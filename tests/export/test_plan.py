"""What folds, what stays dynamic, what is refused, and why: the order of output maps, resolved 'auto', refusals."""

from __future__ import annotations

from typing import Literal, Union

import models
import pytest
import torch
import vlm
import yaml
from export_kit import exp, recipe, rel, tiny_tokenizer, vlm_inputs
from transformers import AutoModelForCausalLM

import attnedit
from attnedit.errors import AttneditError, UnsupportedModelError
from attnedit.recipe import InterventionSpec
from attnedit.tables import FIRST, Bias, KeySet

TOL = 1e-5


def means(heads, layer=1, head_dim=16, seed=0) -> str:
    g = torch.Generator().manual_seed(seed)
    body = ", ".join(
        f"{h}: [{', '.join(f'{float(x):.4f}' for x in torch.randn(head_dim, generator=g))}]" for h in heads
    )
    return f"{{{layer}: {{{body}}}}}"


def roundtrip(model, rec, out, ids, mask):
    """(in-memory patched logits, logits of the export loaded by attnedit with the reference backend)."""
    with torch.no_grad(), attnedit.patch(model, rec, backend="reference"):
        want = model(ids, attention_mask=mask).logits
    attnedit.export(model, rec, out, tokenizer=tiny_tokenizer())
    loaded, _ = attnedit.load(str(out), dtype="float32", device="cpu")
    if hasattr(loaded, "attnedit_patch"):
        loaded.attnedit_patch.backend = "reference"
    with torch.no_grad():
        return want, loaded(ids, attention_mask=mask).logits


def test_zero_pruning_before_a_mean_shift_on_the_same_head_stays_dynamic(tmp_path):
    # prune (x -> 0 x) then mean-ablate (x -> 0 x + m): the head outputs m. Folding the first would output 0.
    model = models.tiny("llama")
    rec = recipe(
        "interventions:\n"
        "  - {type: head_prune, heads: {1: [0, 3]}}\n"
        f"  - {{type: head_prune, ablation: mean, heads: {{1: [3, 5]}}, means: {means([3, 5])}}}\n"
    )
    plan = exp.plan_export(model, rec)
    assert [e.folded for e in plan.edits] == [False, False]
    assert "layer 1 head 3" in plan.edits[0].how and "interventions[1]" in plan.edits[0].how
    ids, mask = models.batch()
    want, got = roundtrip(model, rec, tmp_path / "out", ids, mask)
    assert rel(got, want, mask) < TOL


def test_zero_pruning_after_a_mean_shift_folds(tmp_path):
    # mean-ablate then prune: 0 (0 x + m) = 0; a scale after every shift commutes into o_proj.
    model = models.tiny("llama")
    rec = recipe(
        "interventions:\n"
        f"  - {{type: head_prune, ablation: mean, heads: {{1: [3, 5]}}, means: {means([3, 5])}}}\n"
        "  - {type: head_prune, heads: {1: [0, 3]}}\n"
    )
    plan = exp.plan_export(model, rec)
    assert [e.folded for e in plan.edits] == [False, True]
    ids, mask = models.batch()
    want, got = roundtrip(model, rec, tmp_path / "out", ids, mask)
    assert rel(got, want, mask) < TOL


def test_pruning_on_other_heads_than_a_mean_shift_folds():
    model = models.tiny("llama")
    rec = recipe(
        "interventions:\n"
        "  - {type: head_prune, heads: {1: [0, 1]}}\n"
        f"  - {{type: head_prune, ablation: mean, heads: {{1: [3, 5]}}, means: {means([3, 5])}}}\n"
    )
    assert [e.folded for e in exp.plan_export(model, rec).edits] == [True, False]


def test_scale_commutes_with_biases_and_moves_on_the_same_heads(tmp_path):
    # the claim of attnedit.tables' order of effects: output scales act after biases and moves
    model = models.tiny("mistral")
    rec = recipe(
        "interventions:\n"
        "  - {type: head_prune, heads: {1: [0, 1, 2], 2: [4]}}\n"
        "  - {type: zerotuning, gamma: 0.2, layers: all}\n"
        "  - {type: act, beta: 0.2, tau: 0.03, layers: all}\n"
        "  - {type: head_prune, heads: {2: [5]}}\n"
    )
    assert [e.folded for e in exp.plan_export(model, rec).edits] == [True, False, False, True]
    ids, mask = models.batch()
    want, got = roundtrip(model, rec, tmp_path / "out", ids, mask)
    assert rel(got, want, mask) < TOL


def test_scale_of_one_folds_to_nothing(tmp_path):
    model, processor = vlm.tiny("llava")
    rec = recipe(
        "interventions: [{type: vhr, alpha: 1.0, layers: [1], heads: [0]}, "
        "{type: vhr, alpha: 2.0, layers: [2], heads: [1]}]"
    )
    plan = exp.plan_export(model, rec)
    assert [e.folded for e in plan.edits] == [True, True] and sorted(plan.fold) == [2]
    attnedit.export(model, rec, tmp_path / "out", tokenizer=processor)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_var_sink_dims_are_resolved_and_not_searched_at_load(tmp_path, monkeypatch):
    from attnedit.interventions import var

    model, processor = vlm.tiny("llava")
    rec = recipe("interventions: [{type: var, tau: 1.5, p: 0.2, rho: 1.0, min_image_mass: 0.0, layers: '1:'}]")
    dims = list(var.find_sink_dims(model, 1.5))
    assert dims, "the tiny LLaVA needs sink dimensions at tau 1.5 for this test"
    enc = vlm_inputs(processor)
    with torch.no_grad():
        base = model(**enc).logits
        with attnedit.patch(model, rec, backend="reference"):
            want = model(**enc).logits
    attnedit.export(model, rec, tmp_path / "out", tokenizer=processor)
    written = yaml.safe_load((tmp_path / "out" / exp.DYNAMIC_RECIPE).read_text())
    assert written["interventions"][0]["sink_dims"] == dims
    assert yaml.safe_load((tmp_path / "out" / exp.FULL_RECIPE).read_text())["interventions"][0]["sink_dims"] == dims

    def no_search(*a, **k):
        raise AssertionError("sink dimensions searched again at load")

    monkeypatch.setattr(var, "find_sink_dims", no_search)
    loaded, _ = attnedit.load(str(tmp_path / "out"), dtype="float32", device="cpu")
    loaded.attnedit_patch.backend = "reference"
    with torch.no_grad():
        got = loaded(**enc).logits
    assert rel(got, want, enc.attention_mask) < TOL < rel(base, want, enc.attention_mask)


# -------------------------------------------------------------------------- dynamic parts that would see folded weights


class _ProbeSpec(InterventionSpec):
    type: Literal["reads_weights"]


def test_per_input_head_choice_keeps_everything_dynamic(tmp_path):
    # VHR with heads: auto runs a text-only prefill and reads head outputs before o_proj: folded
    # scales would change what it sees, so the fixed-head VHR beside it is not folded either
    model, processor = vlm.tiny("llava")
    rec = recipe("interventions: [{type: vhr, alpha: 1.5, layers: [1, 2], heads: [0, 2]}, {type: vhr, layers: [2, 3]}]")
    plan = exp.plan_export(model, rec)
    assert [e.folded for e in plan.edits] == [False, False]
    assert "interventions[1] (vhr) computes per-input statistics" in plan.edits[0].how
    enc = vlm_inputs(processor)
    with torch.no_grad():
        base = model(**enc).logits
    with torch.no_grad(), attnedit.patch(model, rec, backend="reference"):
        want = model(**enc).logits
        want_tokens = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=0)
    attnedit.export(model, rec, tmp_path / "out", tokenizer=processor)
    loaded, proc = attnedit.load(str(tmp_path / "out"), dtype="float32", device="cpu")
    assert loaded.attnedit_patch.recipe.interventions[1].heads == "auto"
    loaded.attnedit_patch.backend = "reference"
    with torch.no_grad():
        got = loaded(**enc).logits
        tokens = loaded.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert rel(got, want, enc.attention_mask) < TOL < rel(base, want, enc.attention_mask)
    assert torch.equal(tokens, want_tokens)


def test_intervention_that_reads_weights_keeps_everything_dynamic(method):
    def compile_(spec, info, model=None):
        if model is None:
            raise UnsupportedModelError("needs the model")
        value = float(model.lm_head.weight[0, 0].detach())
        return [Bias(0, (0,), KeySet(on=FIRST), value)]

    method("reads_weights", _ProbeSpec, compile_, reads_weights=True)
    rec = recipe("interventions: [{type: head_prune, heads: {1: [0]}}, {type: reads_weights}]")
    plan = exp.plan_export(models.tiny("llama"), rec)
    assert [e.folded for e in plan.edits] == [False, False]
    assert "reads the weights" in plan.edits[0].how
    alone = recipe("interventions: [{type: head_prune, heads: {1: [0]}}]")
    assert exp.plan_export(models.tiny("llama"), alone).edits[0].folded


# --------------------------------------------------------------------------- refusals


class _AutoSpec(InterventionSpec):
    type: Literal["needs_auto"]
    level: Union[Literal["auto"], float] = "auto"


def test_unresolvable_auto_is_refused_and_named(method, tmp_path):
    def compile_(spec, info, model=None):
        if model is None:
            raise UnsupportedModelError("level: auto is searched in the model")
        return []

    method("needs_auto", _AutoSpec, compile_, reads_weights=lambda spec: spec.level == "auto")
    rec = recipe("interventions: [{type: head_prune, heads: {1: [0]}}, {type: needs_auto}]")
    with pytest.raises(AttneditError, match=r"interventions\[1\]\.level \(needs_auto\): 'auto' is searched"):
        attnedit.export(models.tiny("llama"), rec, tmp_path / "out", tokenizer=tiny_tokenizer())
    assert not (tmp_path / "out").exists()


def test_patched_model_is_refused(tmp_path):
    model = models.tiny("llama")
    rec = recipe("interventions: [{type: zerotuning, gamma: 2.0}]")
    with attnedit.patch(model, rec), pytest.raises(AttneditError, match="patched by attnedit"):
        attnedit.export(model, rec, tmp_path / "out", tokenizer=tiny_tokenizer())
    assert not (tmp_path / "out").exists()


def test_export_with_dynamic_edits_cannot_be_exported_again(tmp_path):
    rec = recipe("interventions: [{type: zerotuning, gamma: 2.0}]")
    attnedit.export(models.tiny("llama"), rec, tmp_path / "one", tokenizer=tiny_tokenizer())
    loaded, tok = attnedit.load(str(tmp_path / "one"), dtype="float32", device="cpu")
    loaded.attnedit_patch.remove()
    with pytest.raises(AttneditError, match=r"attnedit export whose dynamic edits \(zerotuning\)"):
        attnedit.export(loaded, rec, tmp_path / "two", tokenizer=tok)


def test_folded_only_export_can_be_exported_again(tmp_path):
    first = recipe("interventions: [{type: head_prune, heads: {1: [0]}}]")
    attnedit.export(models.tiny("llama"), first, tmp_path / "one", tokenizer=tiny_tokenizer())
    loaded, tok = attnedit.load(str(tmp_path / "one"), dtype="float32", device="cpu")
    attnedit.export(
        loaded, recipe("interventions: [{type: head_prune, heads: {2: [1]}}]"), tmp_path / "two", tokenizer=tok
    )
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "two").config.attnedit
    assert config["base_model"] == str(tmp_path / "one")
    assert config["base_export"]["folded"][0]["type"] == "head_prune"
    w = AutoModelForCausalLM.from_pretrained(tmp_path / "two").model.layers
    assert not w[1].self_attn.o_proj.weight[:, 0:16].any() and not w[2].self_attn.o_proj.weight[:, 16:32].any()
