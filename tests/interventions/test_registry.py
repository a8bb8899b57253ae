"""Method declarations: each built-in method's is complete and true, and the checks made from them."""

from __future__ import annotations

import typing

import models
import pytest
from pydantic import ValidationError

from attnedit.errors import AttneditError
from attnedit.interventions import registry
from attnedit.interventions.registry import Param
from attnedit.modelinfo import ModelInfo
from attnedit.recipe import Recipe
from attnedit.tables import EFFECT_KINDS, Bias, KeySet, compile_recipe

INFO = ModelInfo.from_config(models.tiny("llama").config)
BUILTINS = ("act", "head_prune", "pasta", "var", "vhr", "zerotuning")


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_declaration_is_complete(name):
    m = registry.get(name)
    assert m.name == name and m.summary and m.emits
    assert typing.get_args(m.schema.model_fields["type"].annotation) == (name,)
    assert set(m.emits) <= set(EFFECT_KINDS)
    if m.search is not None:
        assert m.search.about and all(isinstance(p, Param) for p in m.search.params)


def test_compiled_effects_are_of_the_declared_kinds():
    text = INFO  # a text model: the methods that need none of a VLM's tokens
    for body in (
        "{type: act}",
        "{type: zerotuning, gamma: 2}",
        "{type: head_prune, heads: {1: [0]}}",
        "{type: pasta, heads: {0: [1]}}",
    ):
        spec = Recipe.from_str(f"interventions: [{body}]").interventions[0]
        out = registry.get(spec.type).compile(spec, text, None)
        assert out and all(isinstance(e, registry.get(spec.type).emits) for e in out), body


def test_a_compile_step_that_emits_an_undeclared_kind_is_refused(monkeypatch):
    zt = registry.get("zerotuning")

    def sneaky(spec, info, model=None):
        return [Bias(0, (0,), KeySet(), 1.0), object()]

    monkeypatch.setitem(registry._METHODS, "zerotuning", registry.Method(**{**zt.__dict__, "compile": sneaky}))
    with pytest.raises(AttneditError, match=r"'zerotuning' compiled to a object, not one of the effect kinds"):
        compile_recipe(Recipe.from_str("interventions: [{type: zerotuning, gamma: 2}]"), INFO)


def test_the_declared_per_input_and_fold_flags():
    assert [m.name for m in registry.methods() if m.per_input] == ["act", "var", "vhr"]
    assert [m.name for m in registry.methods() if m.fold] == ["head_prune", "vhr"]
    assert [m.name for m in registry.methods() if m.needs_spans] == ["pasta"]
    assert sorted(t for t, s in registry.searched(BUILTINS).items() if not s.needs_task) == ["var"]


# --------------------------------------------------------------------------- --param


def test_params_are_typed_from_the_declarations():
    got = registry.check_params(["zerotuning"], {"gammas": "0.5,2,3", "profile": "layer"})
    assert got == {"gammas": [0.5, 2.0, 3.0], "profile": "layer"}
    assert registry.check_params(["head_prune"], {"k": "7", "prune": "context"}) == {"k": 7, "prune": "context"}
    assert registry.check_params(["head_prune"], {"k": 3}) == {"k": 3}  # already typed


@pytest.mark.parametrize(
    "types, options, message",
    [
        (["head_prune"], {"k": "-3"}, r"--param k=-3: k \(head_prune: how many heads to prune\) is an integer >= 1"),
        (["head_prune"], {"k": "2.5"}, r"k=2\.5: .* is an integer >= 1"),
        (["head_prune"], {"prune": "both"}, r"prune=both: .* is memory or context"),
        (["zerotuning"], {"gammas": "abc"}, r"gammas=abc: .* is a comma-separated list of numbers > 0 and <= 10000"),
        (["zerotuning"], {"gammas": "0.5,,2"}, r"gammas=0\.5,,2: .* list of numbers"),
        (["zerotuning"], {"gammas": "nan"}, r"gammas=nan"),
        (["zerotuning"], {"profile": "heads"}, r"profile=heads: .* is one of head, layer, layer_head"),
        (
            ["zerotuning", "head_prune"],
            {"nosuch": "1"},
            r"--param nosuch=1: no search of this recipe takes 'nosuch'; allowed: zerotuning: profile, gammas; "
            r"head_prune: prune, k, patching, batch_size",
        ),
        (["act"], {"k": "5"}, r"--param k=5: no search of this recipe takes 'k'; allowed: act: screen, combine"),
        (["act"], {"screen": "0"}, r"--param screen=0: screen \(act: .*\) is an integer >= 1"),
        (["var"], {"k": "5"}, r"--param k=5: the searches of this recipe \(var\) take no parameter"),
        (["pasta"], {"k": "5"}, r"--param k=5: this recipe's interventions \(pasta\) have no search to pass it to"),
    ],
)
def test_bad_params_name_the_parameter_and_what_is_allowed(types, options, message):
    with pytest.raises(AttneditError, match=message):
        registry.check_params(types, options)


def test_every_problem_is_reported_at_once():
    with pytest.raises(AttneditError) as e:
        registry.check_params(["head_prune"], {"k": "0", "nosuch": "1"})
    assert len(str(e.value).splitlines()) == 2


# --------------------------------------------------------------------------- task kinds


def test_task_kinds_are_checked_from_the_declarations():
    registry.check_task(["var", "pasta"], None, None)  # no search needs a task
    registry.check_task(["act"], "sst2", "classification")
    registry.check_task(["head_prune"], "lama-conflict", "knowledge_conflict")
    with pytest.raises(AttneditError, match=r"calibrating act needs --task: a classification, .* task"):
        registry.check_task(["act"], None, None)
    with pytest.raises(AttneditError, match=r"zerotuning's search calibrates on a classification, .* or pope task; "):
        registry.check_task(["zerotuning"], "facts-conflict", "knowledge_conflict")


def test_a_search_narrows_its_task_kinds_per_spec():
    """PH3's zero ablation searches on knowledge conflicts only; mean ablation also takes a scored task."""
    zero, mean = Recipe.from_str(
        "interventions: [{type: head_prune, heads: {1: [0]}}, {type: head_prune, ablation: mean, heads: {1: [0]}}]"
    ).interventions
    registry.check_task([zero, mean], "lama-conflict", "knowledge_conflict")
    registry.check_task([mean], "sst2", "classification")
    registry.check_task(["head_prune"], "sst2", "classification")  # a type alone: the method's kinds
    message = (
        r"^head_prune with ablation: zero \(PH3's search on knowledge conflicts\) calibrates on a "
        r"knowledge_conflict task only; 'sst2' is classification$"
    )
    with pytest.raises(AttneditError, match=message):
        registry.check_task([mean, zero, zero], "sst2", "classification")  # once, though two specs fail


def test_ph3_needs_conflicts_that_state_a_context():
    """A knowledge-conflict task's recall form (no context) is refused before any model loads."""
    (zero,) = Recipe.from_str("interventions: [{type: head_prune, heads: {1: [0]}}]").interventions
    registry.check_task([zero], "facts-conflict", "knowledge_conflict", context=True)
    with pytest.raises(AttneditError, match=r"^head_prune's search needs knowledge conflicts whose prompts state a"):
        registry.check_task([zero, "head_prune"], "facts-recall", "knowledge_conflict", context=False)
    registry.check_task(["act"], "sst2", "classification", context=False)  # other searches do not care


def test_a_method_without_effect_kinds_or_twice_is_refused():
    zt = registry.get("zerotuning")
    with pytest.raises(ValueError, match="declares no effect kind"):
        registry.Method("x", zt.schema, zt.compile, "x", emits=())
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(zt)


def test_schema_errors_still_come_from_the_schema():
    with pytest.raises(ValidationError):
        registry.get("zerotuning").schema.model_validate({"type": "zerotuning", "gamma": -1})
