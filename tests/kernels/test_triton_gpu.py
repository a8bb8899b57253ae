"""The compiled Triton kernels against the reference on a CUDA device, and patched tiny models end to end.

The same cases as the interpreter tests, with the production tile shapes and
with small tiles, plus model-sized problems (Llama-3.1-8B and SmolLM2 head
layouts), the flash-kernel paths (ZeroTuning's first token, head scaling) and
tiny models patched with `backend="triton"` against `backend="reference"`.
"""

from __future__ import annotations

from dataclasses import replace

import kernel_cases as kc
import models
import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from attnedit.kernels import triton_ops as ops  # noqa: E402

DEV = "cuda"
BIG = [
    kc.Spec(
        "llama-act-1000",
        B=2,
        H=32,
        Hkv=8,
        Q=1000,
        K=1000,
        D=128,
        dtype=torch.bfloat16,
        mask="pad",
        groups="head",
        moves=("plain",),
    ),
    kc.Spec(
        "llama-zt-2049",
        B=1,
        H=32,
        Hkv=8,
        Q=2049,
        K=2049,
        D=128,
        dtype=torch.bfloat16,
        groups="batch",
        bias=True,
        prefix_only=True,
    ),
    kc.Spec("llama-prune-1531", B=1, H=32, Hkv=8, Q=1531, K=1531, D=128, dtype=torch.bfloat16, scale="head"),
    kc.Spec(
        "smol-var-777",
        B=2,
        H=9,
        Hkv=3,
        Q=777,
        K=777,
        D=64,
        dtype=torch.float16,
        groups="batch",
        G=4,
        moves=("gate+rows",),
    ),
    kc.Spec(
        "smol-pasta-dense-900", B=1, H=9, Hkv=3, Q=900, K=900, D=64, dtype=torch.bfloat16, groups="batch", bias=True
    ),
    kc.Spec(
        "llama-decode-5000",
        B=2,
        H=32,
        Hkv=8,
        Q=1,
        K=5000,
        D=128,
        dtype=torch.bfloat16,
        mask="pad",
        groups="head",
        bias=True,
        moves=("plain",),
    ),
    kc.Spec(
        "gemma-d256-333",
        B=1,
        H=4,
        Hkv=1,
        Q=333,
        K=333,
        D=256,
        dtype=torch.bfloat16,
        groups="batch",
        bias=True,
        moves=("plain",),
    ),
    kc.Spec(
        "chunk-q64-k900",
        B=2,
        H=8,
        Hkv=2,
        Q=64,
        K=900,
        D=128,
        dtype=torch.bfloat16,
        mask="pad",
        groups="batch",
        bias=True,
        moves=("plain",),
    ),
]


@pytest.mark.parametrize("small", [False, True], ids=["tiles-default", "tiles-16"])
@pytest.mark.parametrize("spec", kc.CASES, ids=lambda s: s.name)
def test_cases_match_reference(spec, small):
    kw = dict(config=kc.tiles(spec), splits=3) if small else {}
    r = kc.check_attention(ops, spec, DEV, seed=21, **kw)
    assert r["shape"] and r["dtype"] and r["err"] < kc.TOL[spec.dtype]


@pytest.mark.parametrize("path", [None, "fused"])
@pytest.mark.parametrize("spec", BIG, ids=lambda s: s.name)
def test_model_sized_problems_match_reference(spec, path):
    r = kc.check_attention(ops, spec, DEV, seed=22, path=path)
    assert r["shape"] and r["err"] < kc.TOL[spec.dtype]
    assert r["effect"] > 5 * kc.TOL[spec.dtype]


@pytest.mark.parametrize("spec", kc.MASS_CASES + [BIG[0], BIG[3]], ids=lambda s: s.name)
def test_masses_match_reference(spec):
    r = kc.check_masses(ops, spec, DEV, seed=23)
    assert r["shape"] and r["mass_err"] < 2e-3 and r["err"] < kc.TOL[spec.dtype]


@pytest.mark.parametrize(
    "spec",
    kc.COLSUM_CASES + [replace(BIG[0], name="colsum-llama-1000"), replace(BIG[4], name="colsum-smol-900")],
    ids=lambda s: s.name,
)
def test_column_scores_match_reference(spec):
    r = kc.check_colsum(ops, spec, DEV, seed=24)
    assert r["count_equal"] and r["err"] < max(1e-4, kc.TOL[spec.dtype] / 4)


SPLIT_BIG = [
    kc.Spec("split-llama-1200", B=2, H=32, Hkv=8, Q=1200, K=1200, D=128, dtype=torch.bfloat16),
    kc.Spec("split-smol-900", B=1, H=9, Hkv=3, Q=900, K=900, D=64, dtype=torch.float16),
    kc.Spec("split-llama-overflow", B=1, H=32, Hkv=8, Q=700, K=700, D=128, dtype=torch.bfloat16, extra={"n": 90}),
]


@pytest.mark.parametrize(
    "spec", [c for c in kc.SPLIT_CASES if c.dtype != torch.float32] + SPLIT_BIG, ids=lambda s: s.name
)
def test_split_at_image_span_matches_reference(spec):
    """VAR's tables with an image span: cuDNN on the map's pieces, the combining kernel, the exact fixup."""
    n = spec.extra.get("sparse_after", spec.extra.get("n", 1))
    r = kc.check_split_attention(ops, spec, DEV, seed=25, n_sparse_after=n)
    assert r["split"], "the split path did not run"
    assert r["err"] < kc.TOL[spec.dtype] and r["err"] < 2 * r["err_fused"] + 1e-4, r
    assert r["edited"] > 3 * r["err"], r  # the edit moved the output more than the path's rounding


def test_member_lists():
    from attnedit.kernels import triton_prefill

    assert kc.check_member_list(triton_prefill, DEV)["ok"]


def test_inert_and_fallback():
    r = kc.check_inert(ops, DEV)
    assert r["inert_err"] < 1e-5 and r["live_err"] < 1e-5
    r = kc.check_fallback(ops, DEV)
    assert r["equal"] and r["logged"]


RECIPES = {
    "zerotuning": "interventions: [{type: zerotuning, gamma: 3.0}]",
    "act": "interventions: [{type: act, beta: 0.4, tau: 0.05, layers: all}]",
    "prune": "interventions: [{type: head_prune, heads: {0: [0, 3], 2: [1]}}]",
    "pasta": "interventions: [{type: pasta, alpha: 0.05, heads: {1: all}}]",
    "compose": "interventions: [{type: zerotuning, gamma: 0.5, layers: '1:'}, "
    "{type: act, beta: 0.3, tau: 0.05, layers: all},"
    " {type: head_prune, heads: {3: [2]}}]",
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(RECIPES))
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_patched_tiny_model_triton_equals_reference(arch, name, dtype):
    import attnedit

    if dtype == torch.bfloat16 and name in ("act", "compose"):
        # thresholded detection: in bf16 the backends' hidden states differ by rounding, and a column score
        # next to tau can flip a sink; the kernels' ACT path is compared exactly in fp32 and in the cases above
        pytest.skip("ACT detection is compared in fp32")

    model = models.tiny(arch, dtype=dtype).to(DEV)
    ids, mask = models.batch(T=29, left_pad=(0, 5, 11))
    ids, mask = ids.to(DEV), mask.to(DEV)
    recipe = attnedit.Recipe.from_str(RECIPES[name], "test.yaml")
    spans = [[(3, 9)], [(8, 14)], [(12, 20)]] if name == "pasta" else None
    outs = {}
    with torch.no_grad():
        for backend in ("reference", "triton"):
            with attnedit.patch(model, recipe, backend=backend, spans=spans):
                out = model(ids, attention_mask=mask, use_cache=True)
                step = model(
                    torch.full((3, 1), 7, device=DEV),
                    attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], 1),
                    past_key_values=out.past_key_values,
                )
                outs[backend] = (out.logits[mask.bool()].float(), step.logits.float())
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for i in range(2):
        ref, got = outs["reference"][i], outs["triton"][i]
        assert ((got - ref).norm() / ref.norm()).item() < tol
