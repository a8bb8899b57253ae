"""Patched generation on transformers' fast paths: a static cache, and a decoding step under torch.compile."""

from __future__ import annotations

import contextlib

import models
import pytest
import torch
import vlm
from transformers import StaticCache

import attnedit

# Every method that runs while decoding: biases by position (ZeroTuning, PASTA), output scales (pruning),
# attention sinks found at prefill (ACT).
TEXT_RECIPES = {
    "positional": (
        "interventions:\n"
        "  - {type: zerotuning, gamma: 4.0, layers: '1:'}\n"
        "  - {type: pasta, alpha: 0.05, heads: {0: [0, 1], 2: all}}\n"
        "  - {type: head_prune, heads: {1: [0, 2]}}\n"
    ),
    "act": "interventions: [{type: act, layers: all, tau: 0.05, beta: 0.2}, {type: zerotuning, gamma: 2.0}]",
}
SPANS = [[(2, 6)], [(5, 9)], [(7, 10)]]


def recipe(text: str) -> attnedit.Recipe:
    return attnedit.Recipe.from_str(text, "test.yaml")


@pytest.mark.parametrize("arch", models.TEXT_MODELS)
@pytest.mark.parametrize("name", list(TEXT_RECIPES))
@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "unpadded"])
def test_static_cache_generation_equals_dynamic(arch, name, padded):
    """Unpadded, a static cache's prefill has keys past the last query (transformers gives it no mask)."""
    model = models.tiny(arch)
    B = 3 if padded else 1
    ids, mask = models.batch(B=B, T=11, left_pad=(0, 3, 6), seed=1 if padded else 3)
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad(), attnedit.patch(model, recipe(TEXT_RECIPES[name]), spans=SPANS[:B]):
        dynamic = model.generate(ids, **kw)
        static = model.generate(ids, cache_implementation="static", **kw)
        again = model.generate(ids, cache_implementation="static", **kw)  # the buffers of the first input reused
    with torch.no_grad():
        plain = model.generate(ids, **kw)
    assert not torch.equal(dynamic, plain), "the recipe must change the generated tokens"
    # 12 new tokens cross Mistral's and Gemma3's sliding window of 8
    assert torch.equal(static, dynamic) and torch.equal(again, dynamic)


VLM_RECIPES = {
    "var": {"type": "var", "layers": "all", "sink_dims": [5], "tau": 0.5, "rho": 0.9, "p": 0.6},
    "vhr": {"type": "vhr", "layers": [1, 2, 3], "alpha": 2.0},
}


@pytest.mark.parametrize("method", list(VLM_RECIPES))
def test_static_cache_generation_equals_dynamic_vlm(method):
    """VAR's sinks and VHR's heads, chosen at prefill, hold for the decoding steps on a static cache."""
    model, proc = vlm.tiny("llava")
    batch = vlm.inputs(proc, ["<image>\nwhat is this ?", "<image>\na longer question about the cat ?"], "llava")
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
    r = attnedit.Recipe.from_dict({"interventions": [VLM_RECIPES[method]]})
    with torch.no_grad(), attnedit.patch(model, r, backend="reference"):
        dynamic = model.generate(**batch, **kw)
        static = model.generate(**batch, cache_implementation="static", **kw)
    with torch.no_grad():
        plain = model.generate(**batch, **kw)
    logits = lambda out: torch.stack(out.logits)  # noqa: E731
    assert (logits(dynamic)[1:] - logits(plain)[1:]).abs().max() > 1e-4, "the recipe must change decoding steps"
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(logits(static), logits(dynamic), atol=1e-5, rtol=1e-5)


def _decode_steps(model, step, ids, mask, steps: int = 2) -> torch.Tensor:
    """Eager prefill into a static cache, then `steps` greedy decoding steps through `step`; their logits."""
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 1)
    out = model(ids, attention_mask=mask, past_key_values=cache)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    logits = []
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = step(input_ids=tok, attention_mask=mask, past_key_values=cache)
        logits.append(out.logits[:, -1])
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    return torch.stack(logits)


def _compiled_steps_equal_eager(model, text: str, ids, mask, spans=None, changes_by: float = 1e-3) -> None:
    """Decoding steps of `model` patched with `text` through torch.compile(fullgraph=True) give the eager logits."""
    with torch.no_grad(), attnedit.patch(model, recipe(text), backend="reference", spans=spans):
        eager = _decode_steps(model, model, ids, mask)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        graphed = _decode_steps(model, compiled, ids, mask)
    with torch.no_grad():
        plain = _decode_steps(model, model, ids, mask)
    assert (eager - plain).abs().max() > changes_by, "the recipe must change the logits"
    torch.testing.assert_close(graphed, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_patched_decoding_step_compiles_fullgraph(arch):
    """A decoding step traces into one graph (no host sync, no Python branch on tensor values)."""
    torch._dynamo.reset()
    ids, mask = models.batch(T=11, left_pad=(0, 3, 6))
    text = TEXT_RECIPES["positional"] + "  - {type: act, layers: all, tau: 0.05, beta: 0.2}\n"
    _compiled_steps_equal_eager(models.tiny(arch), text, ids, mask, spans=SPANS)


def test_compiling_a_prefill_that_chooses_heads_per_input_is_a_clear_error():
    """VHR's online head choice runs a forward of its own at prefill: compiling it says so in one message."""
    torch._dynamo.reset()
    model, proc = vlm.tiny("llava")
    batch = vlm.inputs(proc, ["<image>\nwhat is this ?"], "llava")
    r = attnedit.Recipe.from_dict({"interventions": [VLM_RECIPES["vhr"]]})
    with torch.no_grad(), attnedit.patch(model, r, backend="reference"):
        with pytest.raises(Exception, match="run the prefill eagerly and compile or capture the decoding steps"):
            torch.compile(model, fullgraph=True, backend="eager")(**batch)
        model(**batch)  # eager still works


def test_var_decoding_step_compiles_fullgraph():
    """VAR (hidden-state sinks found at prefill, moves after each row's image tokens) traces into one graph too.

    A text model stands in for a VLM: its config names token 255 the image token.
    """
    torch._dynamo.reset()
    model = models.tiny("llama")
    model.config.image_token_id = 255
    ids, mask = models.batch(T=11, left_pad=(0, 3, 6))
    ids[0, 2:6] = ids[1, 5:8] = ids[2, 7:10] = 255
    text = "interventions: [{type: var, tau: 1.5, p: 0.2, rho: 1.0, min_image_mass: 0.0, layers: '1:'}]"
    _compiled_steps_equal_eager(model, text, ids, mask, changes_by=1e-4)


def _fixed_inputs_of_compiled_steps(model, text: str, ids, mask, spans=None, steps: int = 4) -> tuple[dict, list]:
    """Compile `model` patched with `text`, decode `steps` tokens on a static cache, and return what
    torch.compile's CUDA graphs would refuse: (the inputs taken for fixed-address ones whose address
    changed between steps: name -> addresses seen; pairs of graph inputs that share memory, which
    torch.compile merges into one "synthetic base" when the graph writes one of them)."""
    seen: dict[tuple, set] = {}
    shared: list[tuple[str, str]] = []

    def backend(gm, example_inputs):
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        fixed = [getattr(x, "_dynamo_static_input_type", None) is not None for x in example_inputs]
        by_storage: dict[int, str] = {}
        for name, x in zip(names, example_inputs):
            if torch.is_tensor(x):
                other = by_storage.setdefault(x.untyped_storage().data_ptr(), name)
                if other != name:
                    shared.append((other, name))
        graph = len({g for g, _ in seen}) + 1

        def run(*args):
            for name, a, f in zip(names, args, fixed):
                if f and torch.is_tensor(a):
                    seen.setdefault((graph, name), set()).add(a.data_ptr())
            return gm.forward(*args)

        seen[(graph, None)] = set()
        return run

    torch._dynamo.reset()
    with torch.no_grad(), attnedit.patch(model, recipe(text), backend="reference", spans=spans):
        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 1)
        out = model(ids, attention_mask=mask, past_key_values=cache)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        step = torch.compile(model, fullgraph=True, backend=backend)
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            tok = step(input_ids=tok, attention_mask=mask, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)
    moved = {name: len(p) for (_, name), p in seen.items() if name is not None and len(p) > 1}
    return moved, shared


@pytest.mark.parametrize("method", ["var", "pasta", "act"])
def test_compiled_static_steps_give_cuda_graphs_fixed_unaliased_inputs(method):
    """A tensor a compiled step reaches through the patch's hooks counts as a fixed input for torch.compile's
    CUDA graphs: one made anew at every step (positions, input flags) makes them re-record at every step,
    and two inputs that share memory (a layer's key-group buffer and the stack it is a slot of, which the
    step writes) make them skip the step. The runtime keeps such tensors in buffers written in place and
    takes stack slots inside the graph."""
    model = models.tiny("llama")
    model.config.image_token_id = 255
    ids, mask = models.batch(T=11, left_pad=(0, 3, 6))
    ids[0, 2:6] = ids[1, 5:8] = ids[2, 7:10] = 255
    text = {
        "var": "interventions: [{type: var, tau: 1.5, p: 0.2, rho: 1.0, min_image_mass: 0.0, layers: '1:'}]",
        "pasta": "interventions: [{type: pasta, alpha: 0.05, heads: {0: [0, 1], 2: all}}]",
        "act": TEXT_RECIPES["act"],
    }[method]
    moved, shared = _fixed_inputs_of_compiled_steps(model, text, ids, mask, spans=SPANS)
    assert moved == {} and shared == []


@pytest.mark.parametrize("method", list(VLM_RECIPES))
def test_compiled_static_generation_compiles_each_frame_once(method):
    """transformers' compiled static-cache generation, as on a GPU (its compile forced on the CPU, a backend
    that counts graphs): three `generate` calls compile one graph more patched than unpatched (the patch's
    model pre-hook). State that
    changes between a prefill's first decoding step and the next (VHR's selection mode, the patch's
    backend map filled by the first step that needs it) made dynamo compile the step again."""
    from transformers import CompileConfig

    def graphs(recipe) -> list[int]:
        compiled = []

        def counting(gm, example_inputs, **options):  # options: the compile mode, unused
            compiled.append(len(gm.graph.nodes))
            return gm.forward

        config = CompileConfig(backend=counting, fullgraph=False)
        config._compile_all_devices = True  # transformers compiles the decoding step only on accelerators otherwise
        kw = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, cache_implementation="static")
        torch._dynamo.reset()
        ctx = attnedit.patch(model, recipe, backend="reference") if recipe else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            for _ in range(3):
                model.generate(**batch, compile_config=config, **kw)
        torch._dynamo.reset()
        return compiled

    model, proc = vlm.tiny("llava")
    batch = vlm.inputs(proc, ["<image>\nwhat is this ?", "<image>\na longer question about the cat ?"], "llava")
    plain = graphs(None)
    patched = graphs(attnedit.Recipe.from_dict({"interventions": [VLM_RECIPES[method]]}))
    assert plain, "the decoding step was not compiled"
    # the patch's model pre-hook is a frame of its own (dynamo starts a frame at each hook and forward)
    assert len(patched) == len(plain) + 1, f"graphs of {patched} nodes patched, {plain} unpatched"
