"""The Triton backend on transformers' fast generation paths, on a CUDA device.

A patched tiny model generates the same tokens on a static cache as on a dynamic
one; a decoding step compiled with torch.compile(fullgraph=True) (the kernels as
custom operators) and a decoding step captured by hand in a CUDA graph and
replayed give the eager logits.
"""

from __future__ import annotations

import models
import pytest
import torch
from transformers import StaticCache

import attnedit

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

RECIPES = {
    "positional": (
        "interventions:\n"
        "  - {type: zerotuning, gamma: 4.0, layers: '1:'}\n"
        "  - {type: pasta, alpha: 0.05, heads: {0: [0, 1], 2: all}}\n"
        "  - {type: head_prune, heads: {1: [0, 2]}}\n"
    ),
    "act": "interventions: [{type: act, layers: all, tau: 0.05, beta: 0.2}, {type: zerotuning, gamma: 2.0}]",
}
# moves with per-input row starts (after each row's image tokens, the config's image token id 255)
VAR = "interventions: [{type: var, tau: 1.5, p: 0.2, rho: 1.0, min_image_mass: 0.0, layers: '1:'}]"
# per-input head scales: the prefill runs no kernel (its heads are scaled at o_proj), the decoding steps do
VHR = "interventions: [{type: vhr, layers: [1, 2, 3], alpha: 2.0}]"
SPANS = [[(2, 6)], [(5, 9)], [(7, 10)]]


def recipe(name: str) -> attnedit.Recipe:
    return attnedit.Recipe.from_str(RECIPES[name], "test.yaml")


def tiny(arch: str, dtype=torch.float32):
    return models.tiny(arch, dtype=dtype).cuda()


def batch(T: int = 11):
    ids, mask = models.batch(T=T, left_pad=(0, 3, 6))
    return ids.cuda(), mask.cuda()


def _with_images(name: str, model, ids) -> str:
    """The recipe text of `name`; for VAR and VHR the config names id 255 its image token and each row holds some."""
    if name not in ("var", "vhr"):
        return RECIPES[name]
    model.config.image_token_id = 255
    ids[0, 2:6] = ids[1, 6:9] = ids[2, 8:11] = 255
    return VAR if name == "var" else VHR


def _fresh_kernel_caches():
    """Forget what earlier tests left in the kernels' per-process caches (placeholders, packed tables), so
    that a test sees what a new process does: its first kernel call may come inside a compiled step."""
    from attnedit.kernels import triton_common, triton_ops

    triton_common._PLACEHOLDERS.clear()
    triton_ops._memo_cache.clear()


@pytest.mark.parametrize("name", ["positional", "act", "var", "vhr"])
def test_transformers_compiled_static_generation_equals_dynamic_triton(name):
    """generate(cache_implementation="static") as transformers runs it by default: the decoding step compiled
    with mode "reduce-overhead" (CUDA graph trees). A step replayed from the graph's memory pool must find
    what the prefill prepared (packed moves, plans) instead of allocating and keeping tensors there, and
    must not copy between host and device. The static generates come first in a process whose kernels have
    kept nothing yet: with VHR the first kernel call is the compiled step's (its tensors kept across calls
    must not land in the graphs' pool)."""
    torch._dynamo.reset()
    _fresh_kernel_caches()
    model = tiny("llama")
    ids, mask = batch()
    text = _with_images(name, model, ids)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad(), attnedit.patch(model, attnedit.Recipe.from_str(text, "test.yaml"), spans=SPANS):
        static = [model.generate(ids, cache_implementation="static", **kw) for _ in range(2)]
        dynamic = model.generate(ids, **kw)
    torch._dynamo.reset()
    assert torch.equal(static[0], dynamic) and torch.equal(static[1], dynamic)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("name", list(RECIPES))
def test_static_cache_generation_equals_dynamic_triton(arch, name):
    model = tiny(arch)
    ids, mask = batch()
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, disable_compile=True)
    with torch.no_grad(), attnedit.patch(model, recipe(name), backend="triton", spans=SPANS):
        dynamic = model.generate(ids, **kw)
        static = model.generate(ids, cache_implementation="static", **kw)
    with torch.no_grad(), attnedit.patch(model, recipe(name), backend="reference", spans=SPANS):
        oracle = model.generate(ids, **kw)
    assert torch.equal(dynamic, oracle)
    assert torch.equal(static, dynamic)


def _decode(model, step, ids, mask, steps: int):
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 1)
    out = model(ids, attention_mask=mask, past_key_values=cache)
    tok = out.logits[:, -1].argmax(-1, keepdim=True)
    logits = []
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = step(input_ids=tok, attention_mask=mask, past_key_values=cache)
        logits.append(out.logits[:, -1].float())
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    return torch.stack(logits)


@pytest.mark.parametrize("name", [*RECIPES, "var"])
def test_compiled_decoding_step_equals_eager_triton(name):
    """fullgraph=True: the model pre-hook's per-forward work traces without a break (with this GPU's torch too)."""
    torch._dynamo.reset()
    model = tiny("llama", torch.bfloat16)
    ids, mask = batch()
    text = _with_images(name, model, ids)
    patch = attnedit.patch(model, attnedit.Recipe.from_str(text, "t.yaml"), backend="triton", spans=SPANS)
    with torch.no_grad(), patch:
        eager = _decode(model, model, ids, mask, 3)
        compiled = _decode(model, torch.compile(model, fullgraph=True), ids, mask, 3)
    torch.testing.assert_close(compiled, eager, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("name", list(RECIPES))
def test_cuda_graph_replay_equals_eager_triton(name):
    """Capture one decoding step on a static cache, replay it for several steps."""
    model = tiny("llama")
    ids, mask = batch()
    B, T = ids.shape
    steps = 5
    L = T + steps + 1
    with torch.no_grad(), attnedit.patch(model, recipe(name), backend="triton", spans=SPANS):
        eager = _decode(model, model, ids, mask, steps)

        cache = StaticCache(config=model.config, max_cache_len=L)
        full = torch.zeros(B, L, dtype=mask.dtype, device="cuda")
        full[:, :T] = mask
        out = model(ids, attention_mask=full[:, :T], past_key_values=cache)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        static_tok = tok.clone()
        full[:, T:] = 1  # a fixed-size padding mask: positions after the current one are hidden by causality
        # warm up on a side stream, then capture one step, rewinding the cache's position after each
        pos = cache.layers[0].cumulative_length.clone()

        def rewind():
            for layer in cache.layers:
                layer.cumulative_length.copy_(pos)

        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                model(input_ids=static_tok, attention_mask=full, past_key_values=cache)
                rewind()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(input_ids=static_tok, attention_mask=full, past_key_values=cache).logits
        rewind()
        replayed = []
        for _ in range(steps):
            graph.replay()
            logits = static_out[:, -1].float().clone()
            replayed.append(logits)
            static_tok.copy_(logits.argmax(-1, keepdim=True))
    torch.testing.assert_close(torch.stack(replayed), eager, atol=1e-4, rtol=1e-4)
