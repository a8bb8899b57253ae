"""VAR's automatic sink-dimension finder."""

from __future__ import annotations

import models
import pytest
import torch

from attnedit.interventions import var


def _with_massive(dims_first=(300,), dims_everywhere=(41,), hidden=512):
    """A tiny Llama whose first token carries a massive activation in `dims_first` (as real LLMs do at BOS)
    and whose every token is large in `dims_everywhere` (a large dimension that marks no sink)."""
    model = models.tiny("llama", hidden_size=hidden, num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        for d in dims_everywhere:
            emb[:, d] = 3.0
        for d in dims_first:
            emb[1, d] = 2000.0  # token 1 is the BOS id of the tiny configs
    return model


def test_finds_the_first_tokens_massive_dimension_only():
    model = _with_massive()
    assert var.find_sink_dims(model, tau=20.0) == (300,)


def test_random_model_has_no_sink_dimension():
    assert var.find_sink_dims(models.tiny("llama"), tau=20.0) == ()


def test_hidden_sinks_need_a_visual_sink_in_the_row():
    det = var.HiddenSinks(dims=(0,), tau=2.0)
    hidden = torch.ones(2, 5, 16)
    hidden[:, 0, 0] = 50.0  # a text sink in both rows
    hidden[1, 3, 0] = 50.0  # a visual sink in row 1 only
    image = torch.zeros(2, 5, dtype=torch.uint8)
    image[:, 2:4] = var.IMAGE
    found = det.detect(hidden, image)
    assert found[0].tolist() == [False] * 5  # row 0: no visual sink -> VAR leaves it alone
    assert found[1].tolist() == [True, False, False, True, False]
    assert det.detect(hidden, None).sum() == 0 and det.prefill_only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalised_at_equals_the_full_normalisation_in_the_chosen_dimensions(dtype):
    """The detector's form (the dimensions as views, no index tensor) is exactly the paper's |h / rms(h)|
    read at those dimensions, in fp32 for bf16 states too."""
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(2, 7, 64, generator=g) * 3).to(dtype)
    hidden[0, 0, 5] = 400.0
    dims = (5, 2, 40)
    want = var.normalised(hidden)[..., list(dims)]
    got = var.normalised_at(hidden, dims)
    assert got.dtype == torch.float32 and got.shape == (2, 7, 3)
    assert torch.equal(got, want)


@pytest.mark.slow
def test_smollm2_sink_dimension_flags_mostly_first_tokens(smollm2):
    model, tok = smollm2
    dims = var.find_sink_dims(model, tau=20.0)
    assert dims, "SmolLM2-135M has a massive-activation dimension (507 at the first token)"
    enc = tok(
        ["Paris is the capital of France.", "The quick brown fox jumps over the lazy dog again."],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states
    flagged = torch.stack([var.normalised(h)[..., list(dims)].amax(-1) > 20.0 for h in hs[3:-1]])  # (L, B, T)
    mask = enc["attention_mask"].bool()
    first_pos = mask.int().argmax(-1)  # the first real token of each row, whichever side pads
    is_first = torch.zeros_like(mask)
    is_first[torch.arange(mask.shape[0]), first_pos] = True
    first = flagged[:, is_first].float().mean()
    others = flagged[:, mask & ~is_first].float().mean()
    assert first > 0.5 and others < 0.05, (first, others)


def test_act_threshold_is_copied_to_a_device_once():
    """A prefill on another device reuses one copy of tau (a copy per prefill would block CUDA-graph capture)."""
    from attnedit.interventions.act import ActSinks

    det = ActSinks(torch.tensor([0.1, float("nan")]))
    meta = torch.device("meta")
    first = det._tau_on(meta)
    assert first.device == meta and first.shape == (2,)
    assert det._tau_on(meta) is first
    assert det._tau_on(torch.device("cpu")) is det.tau
