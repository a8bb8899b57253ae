"""Each text method against a slow implementation of its paper's formula, written here.

Every test patches a tiny random model with grouped-query attention, runs a
left-padded batch of 3 (prefill, then one decoding step with the cache), and
checks, layer by layer, that the patched attention's output equals the output
of the formula applied to the plain attention map of the same q/k/v.
"""

from __future__ import annotations

import math

import models
import pytest
import torch
from transformers import DynamicCache

import attnedit
from attnedit.recipe import Recipe

TOL = dict(atol=2e-5, rtol=1e-4)


def run(model, recipe, spy, spans=None):
    """Prefill + one decoding step under the patch; returns (calls, mask of the decoding step)."""
    ids, mask = models.batch(B=3, T=13, left_pad=(0, 4, 7))
    with attnedit.patch(model, recipe, backend="reference", spans=spans) as p:
        calls = spy(p)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            mask2 = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
            model(input_ids=nxt, attention_mask=mask2, cache=cache, use_cache=True)
    return calls, mask, mask2


def first_real(mask):
    return mask.argmax(1)  # (B,) index of each row's first real token (left padding)


def check(calls, mask, mask2, expected_fn, oracle, layers):
    """Compare every recorded call of `layers` with expected_fn(call, dense_mask, step)."""
    seen = 0
    for step, c in enumerate([c for c in calls if c["layer"] in layers]):
        m = mask if c["q"].shape[2] > 1 else mask2
        dense = oracle.causal_mask(m, c["q"].shape[2])
        want = expected_fn(c, dense, m).nan_to_num(0.0)
        real = m[:, m.shape[1] - c["q"].shape[2] :].bool().view(m.shape[0], -1, 1, 1)  # padding query rows: no output
        torch.testing.assert_close(c["out"].double() * real, want * real, **TOL)
        seen += 1
    assert seen == 2 * len(layers)  # prefill and decoding step of each layer


@pytest.fixture(scope="module")
def llama():
    return models.tiny("llama")  # 8 query heads sharing 2 key/value heads


def test_zerotuning_matches_paper_formula(llama, spy, oracle):
    gamma, heads = 3.0, [1, 2, 6]
    recipe = Recipe.from_dict(
        {"interventions": [{"type": "zerotuning", "gamma": gamma, "layers": [1, 3], "heads": heads}]}
    )
    calls, mask, mask2 = run(llama, recipe, spy)

    def expected(c, dense, m):
        a = oracle.probs(c["q"], c["k"], dense)  # (B, H, Q, K)
        first = first_real(m)
        a0 = a[torch.arange(3), :, :, first]  # (B, H, Q) attention to the first real token
        d = 1 + (gamma - 1) * a0
        new = a / d[..., None]
        new[torch.arange(3), :, :, first] = gamma * a0 / d
        sel = torch.zeros(a.shape[1], dtype=torch.bool)
        sel[heads] = True
        return oracle.apply_v(torch.where(sel.view(1, -1, 1, 1), new, a), c["v"])

    check(calls, mask, mask2, expected, oracle, {1, 3})


def test_act_matches_paper_formula(llama, spy, oracle):
    beta, tau = 0.4, 0.06
    recipe = Recipe.from_dict({"interventions": [{"type": "act", "beta": beta, "tau": tau, "layers": [1, 2]}]})
    calls, mask, mask2 = run(llama, recipe, spy)
    sinks = {}
    total_sinks = 0

    def expected(c, dense, m):
        nonlocal total_sinks
        a = oracle.probs(c["q"], c["k"], dense)
        B, H, Q, K = a.shape
        if Q > 1:  # prefill: column score = sum of the column / rows that can see it; first token never a sink
            score = a.sum(2) / dense.double().sum(2).clamp_min(1)  # (B, H, K)
            s = score > tau
            s[torch.arange(B), :, first_real(m)] = False
            sinks[c["layer"]] = s
            total_sinks += int(s.sum())
        s = sinks[c["layer"]]
        s = torch.cat([s, torch.zeros(B, H, K - s.shape[2], dtype=torch.bool)], 2)[
            :, :, None, :
        ]  # generated tokens: no sink
        sink_mass = (a * s).sum(-1, keepdim=True)
        rest = (a * ~s).sum(-1, keepdim=True)
        new = torch.where(s, beta * a, a * (1 + (1 - beta) * sink_mass / rest))
        return oracle.apply_v(new, c["v"])

    check(calls, mask, mask2, expected, oracle, {1, 2})
    assert total_sinks > 0, "the test input should contain sinks other than the first token"


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_head_prune_matches_definition(llama, spy, oracle, ablation):
    heads = {1: [0, 5], 3: [7]}
    spec = {"type": "head_prune", "heads": heads, "ablation": ablation}
    g = torch.Generator().manual_seed(3)
    means = {l: {h: torch.randn(16, generator=g).tolist() for h in hs} for l, hs in heads.items()}
    if ablation == "mean":
        spec["means"] = means
    calls, mask, mask2 = run(llama, Recipe.from_dict({"interventions": [spec]}), spy)

    def expected(c, dense, m):
        o = oracle.apply_v(oracle.probs(c["q"], c["k"], dense), c["v"])  # (B, Q, H, D)
        for h in heads[c["layer"]]:
            o[:, :, h] = torch.tensor(means[c["layer"]][h], dtype=o.dtype) if ablation == "mean" else 0.0
        return o

    check(calls, mask, mask2, expected, oracle, {1, 3})


def test_pasta_matches_paper_formula(llama, spy, oracle):
    alpha, heads = 0.01, {0: [2, 3], 2: [0, 7]}
    spans = [[(2, 5), (8, 10)], [(6, 9)], [(11, 13)]]
    recipe = Recipe.from_dict({"interventions": [{"type": "pasta", "alpha": alpha, "heads": heads}]})
    prompt_len = 13
    calls, mask, mask2 = run(llama, recipe, spy, spans=[s + [(prompt_len, 10**9)] for s in spans])

    def expected(c, dense, m):
        rep = c["q"].shape[1] // c["k"].shape[1]
        k = c["k"].double().repeat_interleave(rep, 1)
        s = c["q"].double() @ k.transpose(-1, -2) / math.sqrt(c["q"].shape[-1])
        K = s.shape[-1]
        outside = torch.ones(3, K, dtype=torch.bool)
        outside[:, prompt_len:] = False  # generated tokens are never biased
        for b, ranges in enumerate(spans):
            for lo, hi in ranges:
                outside[b, lo:hi] = False
        sel = torch.zeros(s.shape[1], dtype=torch.bool)
        sel[heads[c["layer"]]] = True
        bias = (sel.view(1, -1, 1, 1) & outside.view(3, 1, 1, K)).double() * math.log(alpha)
        a = torch.softmax((s + bias).masked_fill(~dense, float("-inf")), -1)
        return oracle.apply_v(a, c["v"])

    check(calls, mask, mask2, expected, oracle, {0, 2})
