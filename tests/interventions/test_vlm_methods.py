"""VAR and VHR on tiny random vision-language models (LLaVA, Qwen2-VL, SmolVLM) built from real configs,
with images through each model's own processor, against slow implementations written here.
"""

from __future__ import annotations

import pytest
import torch
import vlm

import attnedit
from attnedit.modelinfo import decoder_layers
from attnedit.recipe import Recipe

TOL = dict(atol=2e-5, rtol=1e-4)
QUESTIONS = ["<image>\nwhat is this ?", "<image>\na longer question about the color of the cat please ?"]


@pytest.fixture(scope="module", params=vlm.VLMS)
def tiny_vlm(request):
    model, proc = vlm.tiny(request.param)
    return request.param, model, proc, vlm.inputs(proc, QUESTIONS, request.param)


def prefill_and_step(model, batch, recipe, spy, record=None):
    """Prefill + one decoding step under the patch. Returns (patch, attention calls, masks per step)."""
    with attnedit.patch(model, recipe, backend="reference") as p:
        calls = spy(p)
        with torch.no_grad():  # generate: the prefill, then one decoding step on the cache
            model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False, use_cache=True)
    mask2 = torch.cat([batch["attention_mask"], torch.ones_like(batch["attention_mask"][:, :1])], 1)
    return p, calls, (batch["attention_mask"], mask2)


def layer_inputs(model):
    """Register pre-hooks recording every decoder layer's input hidden states; returns (store, handles)."""
    store: dict[int, list] = {}
    handles = []
    for i, layer in enumerate(decoder_layers(model)):

        def grab(m, args, kwargs, i=i):
            store.setdefault(i, []).append((args[0] if args else kwargs["hidden_states"]).detach().double())

        handles.append(layer.register_forward_pre_hook(grab, with_kwargs=True))
    return store, handles


def test_var_matches_paper_formula(tiny_vlm, spy, oracle):
    name, model, proc, batch = tiny_vlm
    image = batch["input_ids"] == getattr(
        model.config, "image_token_id", getattr(model.config, "image_token_index", None)
    )
    dim, layers = 5, [0, 1, 2]
    store, handles = layer_inputs(model)
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    xhat = lambda h: h.abs() / (h.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()  # noqa: E731  (the authors' eps)
    real_tokens = batch["attention_mask"].bool()
    xs = torch.cat([xhat(store[l][0])[..., dim][real_tokens] for l in layers])
    # a threshold that makes some tokens sinks, halfway between two neighbouring values: no token sits
    # within rounding of it (the detector's RMS and this formula's need not agree to the last bit)
    v = xs.sort().values
    i = int(0.85 * (len(v) - 1))
    tau = float((v[i] + v[i + 1]) / 2)
    p, rho, floor = 0.6, 0.9, 0.05
    recipe = Recipe.from_dict(
        {
            "interventions": [
                {
                    "type": "var",
                    "layers": layers,
                    "sink_dims": [dim],
                    "tau": tau,
                    "rho": rho,
                    "p": p,
                    "min_image_mass": floor,
                }
            ]
        }
    )
    store, handles = layer_inputs(model)
    try:
        _, calls, masks = prefill_and_step(model, batch, recipe, spy)
    finally:
        for h in handles:
            h.remove()
    B, T = image.shape
    edited = 0
    for c in [c for c in calls if c["layer"] in layers]:
        Q = c["q"].shape[2]
        m = masks[0] if Q > 1 else masks[1]
        K = m.shape[1]
        a = oracle.probs(c["q"], c["k"], oracle.causal_mask(m, Q))  # (B, H, Q, K)
        hid = store[c["layer"]][0]  # prefill input of this layer: sinks are found there only
        sink = (xhat(hid)[..., dim] > tau) & batch["attention_mask"].bool()
        sink &= (sink & image).any(1, keepdim=True)  # no visual sink in a row: nothing to do there
        sink = torch.cat([sink, torch.zeros(B, K - T, dtype=torch.bool)], 1).view(B, 1, 1, K)
        img = torch.cat([image, torch.zeros(B, K - T, dtype=torch.bool)], 1).view(B, 1, 1, K)
        img_mass = (a * img).sum(-1, keepdim=True)
        vis_sink = (a * (img & sink)).sum(-1, keepdim=True)
        after = torch.arange(K - Q, K).view(1, 1, Q, 1) >= (torch.where(image, torch.arange(T), -1).amax(1) + 1).view(
            B, 1, 1, 1
        )
        gate = (img_mass >= floor) & (vis_sink <= rho * img_mass) & after & (img_mass > 0)
        freed = (1 - p) * (a * sink).sum(-1, keepdim=True)
        target = img & ~sink
        tmass = (a * target).sum(-1, keepdim=True)
        new = torch.where(sink, p * a, a)
        new = torch.where(target, a * (1 + freed / tmass.clamp_min(1e-30)), new)
        new = torch.where(gate & (tmass > 0), new, a)
        edited += int((gate & (freed > 0)).sum())
        want = oracle.apply_v(new, c["v"])
        real = m[:, K - Q :].bool().view(B, Q, 1, 1)
        torch.testing.assert_close(c["out"].double() * real, want * real, **TOL)
    assert edited > 0, "the test input should have image-centric rows with sinks"


def _text_only_outputs(model, batch, drop_ids):
    """The test's own text-only prefill: image tokens removed, left padding, o_proj inputs at the last position."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = [ids[b][(mask[b] == 1) & ~torch.isin(ids[b], torch.tensor(drop_ids))] for b in range(ids.shape[0])]
    T = max(len(r) for r in rows)
    text = torch.zeros(len(rows), T, dtype=ids.dtype)
    tmask = torch.zeros_like(text)
    for b, r in enumerate(rows):
        text[b, T - len(r) :], tmask[b, T - len(r) :] = r, 1
    got = {}
    hooks = [
        decoder_layers(model)[l].self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, l=l: got.__setitem__(l, a[0][:, -1].double())
        )
        for l in range(len(decoder_layers(model)))
    ]
    with torch.no_grad():
        model.get_decoder()(input_ids=text, attention_mask=tmask, position_ids=(tmask.cumsum(1) - 1).clamp_min(0))
    for h in hooks:
        h.remove()
    return got


def test_vhr_online_heads_match_paper_rule(tiny_vlm, spy, oracle):
    name, model, proc, batch = tiny_vlm
    cfg = model.config
    image_id = getattr(cfg, "image_token_id", None) or cfg.image_token_index
    drop = [image_id] + [
        v for k in ("vision_start_token_id", "vision_end_token_id") if (v := getattr(cfg, k, None)) is not None
    ]
    text_o = _text_only_outputs(model, batch, drop)
    alpha, layers = 2.0, [1, 2, 3]
    outs: dict[int, list] = {}
    hooks = [
        decoder_layers(model)[l].self_attn.o_proj.register_forward_hook(
            lambda m, a, o, l=l: outs.setdefault(l, []).append(a[0].detach().double())
        )
        for l in layers
    ]
    try:
        recipe = Recipe.from_dict({"interventions": [{"type": "vhr", "layers": layers, "alpha": alpha}]})
        _, calls, masks = prefill_and_step(model, batch, recipe, spy)
    finally:
        for h in hooks:
            h.remove()
    B, H = batch["input_ids"].shape[0], model.config.get_text_config().num_attention_heads
    chosen = {}
    T = batch["input_ids"].shape[1]
    real_calls = [
        c for c in calls if c["layer"] in layers and c["k"].shape[2] in (T, T + 1)
    ]  # not the text-only prefill
    assert len(real_calls) == 2 * len(layers)
    for c in real_calls:
        Q = c["q"].shape[2]
        m = masks[0] if Q > 1 else masks[1]
        o = oracle.apply_v(oracle.probs(c["q"], c["k"], oracle.causal_mask(m, Q)), c["v"])  # (B, Q, H, D) plain
        D = o.shape[-1]
        if Q > 1:  # the choice, from the last prompt position
            ref = text_o[c["layer"]].view(B, H, D)
            vhd = (o[:, -1] - ref).pow(2).sum(-1)  # (B, H)
            norm = ref.norm(dim=-1)
            sel = torch.zeros(B, H, dtype=torch.bool)
            for b in range(B):
                out_ = (
                    (vhd[b].std() > 1)
                    & (vhd[b] > vhd[b].mean() + vhd[b].std())
                    & (norm[b] > norm[b].mean() + norm[b].std())
                )
                keep = vhd[b][~out_]
                med = keep.sort().values[(len(keep) - 1) // 2]  # lower median
                sel[b] = ~out_ & (vhd[b] > med)
            chosen[c["layer"]] = sel
        scale = torch.where(chosen[c["layer"]], alpha, 1.0).view(B, 1, H, 1)
        want = (o * scale).reshape(B, Q, H * D)
        got = [x for x in outs[c["layer"]] if x.shape[1] == Q][0 if Q > 1 else -1]  # not the text-only prefill
        real = m[:, m.shape[1] - Q :].bool().view(B, Q, 1)
        torch.testing.assert_close(got * real, want * real, **TOL)
    assert all(0 < int(s.sum()) < B * H for s in chosen.values()), "VHR should keep some heads, not all"


@pytest.mark.parametrize("method", ["var", "vhr"])
def test_vlm_method_on_text_model_fails_clearly(method):
    import models

    model = models.tiny("llama")
    recipe = Recipe.from_dict({"interventions": [{"type": method}]}, source="r.yaml")
    with pytest.raises(attnedit.RecipeError, match=f"{method.upper()} needs a vision-language model"):
        attnedit.patch(model, recipe)


def test_vhr_reapplied_patch_reinforces_again_and_removes_cleanly(tiny_vlm):
    name, model, proc, batch = tiny_vlm
    recipe = Recipe.from_dict({"interventions": [{"type": "vhr", "layers": [1, 2], "alpha": 3.0}]})
    with torch.no_grad():
        plain = model(**batch).logits
        p = attnedit.patch(model, recipe, backend="reference")
        runs = []
        for _ in range(2):
            with p:
                runs.append(model(**batch).logits)
        after = model(**batch).logits
    torch.testing.assert_close(runs[0], runs[1])
    assert not torch.allclose(runs[0], plain, atol=1e-4)
    torch.testing.assert_close(after, plain)  # no hook left behind


def test_vhr_fixed_heads_scale_statically(tiny_vlm, spy, oracle):
    name, model, proc, batch = tiny_vlm
    recipe = Recipe.from_dict({"interventions": [{"type": "vhr", "heads": {2: [0]}, "alpha": 2.0}]})
    with attnedit.patch(model, recipe, backend="reference") as p:
        assert not p.compiled.forward_hooks and p.compiled.layers[2].out_scale.tolist()[:2] == [2.0, 1.0]


def test_var_prefill_tables_carry_the_image_span(tiny_vlm, monkeypatch):
    """VAR's prefill tables name the image span where every row has the same one (a kernel may split the
    attention there); a batch whose rows' spans differ, and a decoding step, get none."""
    from attnedit.kernels import dispatch

    name, model, proc, batch = tiny_vlm
    seen = []
    real = dispatch.attention

    def record(backend, q, k, v, tables, mask, **kw):
        seen.append((q.shape[2] > 1, tables.image_span))
        return real(backend, q, k, v, tables, mask, **kw)

    monkeypatch.setattr(dispatch, "attention", record)
    recipe = Recipe.from_dict({"interventions": [{"type": "var", "layers": [0, 1], "sink_dims": [5]}]})
    image_id = getattr(model.config, "image_token_id", getattr(model.config, "image_token_index", None))
    for inputs in (vlm.inputs(proc, QUESTIONS[:1], name), batch):
        image = inputs["input_ids"] == image_id
        pos = torch.arange(image.shape[1])
        spans = {(int(pos[row].min()), int(pos[row].max()) + 1) for row in image}
        want = spans.pop() if len(spans) == 1 else None
        seen.clear()
        with attnedit.patch(model, recipe, backend="reference"), torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        assert [span for prefill, span in seen if prefill] == [want, want], (name, seen, want)
        assert [span for prefill, span in seen if not prefill] == [None, None], (name, seen)
