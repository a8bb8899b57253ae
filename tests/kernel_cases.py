"""Random attention problems with parameter tables, for comparing the Triton kernels with the reference.

`case(spec, device, seed)` draws q/k/v, a `MaskInfo` and `LayerTables` with
every feature a spec asks for; `CASES` is the list the kernel tests run (odd
lengths, grouped-query ratios 1/3/4/8, padding, dense masks, every table
feature, the three dtypes, decode, Q < K). Logits are sharpened and a few keys
are made into strong sinks so that edits change the output.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from attnedit.tables import LayerTables, MaskInfo, Move

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@dataclass(frozen=True)
class Spec:
    name: str
    B: int = 2
    H: int = 4
    Hkv: int = 1
    Q: int = 37
    K: int = 37
    D: int = 16
    dtype: torch.dtype = torch.float32
    mask: str = "causal"  # causal | pad (left padding, kv_start) | dense (arbitrary, some rows empty)
    groups: str = "none"  # none | batch (Hg = 1) | head (Hg = H)
    G: int = 2
    bias: bool = False
    moves: tuple[str, ...] = ()  # each: "plain" | "gate" | "rows" (row start) | "gate+rows"
    scale: str = "none"  # none | head | batch
    shift: bool = False
    prefix_only: bool = False  # flagged keys only at each row's first real key (ZeroTuning)
    extra: dict = field(default_factory=dict)


def _mask(spec: Spec, gen: torch.Generator, device) -> tuple[MaskInfo, torch.Tensor]:
    B, Q, K = spec.B, spec.Q, spec.K
    q_off = K - Q
    if spec.mask == "causal":
        return MaskInfo(None, q_off, 0, None, torch.zeros(B, dtype=torch.long, device=device)), torch.zeros(
            B, dtype=torch.long
        )
    if spec.mask == "pad":
        pads = torch.randint(0, max(1, K // 2), (B,), generator=gen)
        pads[0] = 0
        i = torch.arange(Q).view(1, Q, 1) + q_off
        j = torch.arange(K).view(1, 1, K)
        dense = (j >= pads.view(B, 1, 1)) & (j <= i)
        info = MaskInfo(dense[:, None].to(device), q_off, 0, pads.to(device), pads.to(device))
        return info, pads
    dense = torch.rand(B, 1, Q, K, generator=gen) < 0.6
    if Q > 2:
        dense[:, :, Q // 3] = False  # a fully masked row
    dense[:, :, :, 0] |= torch.rand(B, 1, Q, generator=gen) < 0.8
    first = dense[:, 0].any(1).int().argmax(1).long()
    return MaskInfo(dense.to(device), q_off, 0, None, first.to(device)), first


def _groups(spec: Spec, first: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(B, Hg, K) uint8 group ids: a few sparse flagged keys per row, or only each row's first key."""
    B, K = spec.B, spec.K
    Hg = spec.H if spec.groups == "head" else 1
    g = torch.zeros(B, Hg, K, dtype=torch.uint8)
    if spec.prefix_only:
        g[torch.arange(B), :, first.clamp_min(0)] = 1
        return g
    flagged = torch.rand(B, Hg, K, generator=gen) < 0.12
    ids = torch.randint(1, spec.G, (B, Hg, K), generator=gen, dtype=torch.uint8)
    g = torch.where(flagged, ids, g)
    if spec.G > 2 and K > 12:  # a contiguous "image" span of group 1 with sinks (group 3) inside
        lo = K // 4
        g[:, :, lo : lo + K // 4] = 1
        g[:, :, lo + 2] = spec.G - 1
    g[torch.arange(B), :, first.clamp_min(0)] = spec.G - 1
    return g


def _moves(spec: Spec, gen: torch.Generator, device) -> tuple[Move, ...]:
    out = []
    G, H, B = spec.G, spec.H, spec.B
    for i, kind in enumerate(spec.moves):
        keep = torch.rand(H, generator=gen) * 0.9
        keep[0] = 1.0  # an untouched head
        src = 1 << (G - 1) if i % 2 == 0 else (1 << 1)
        dst = ((1 << G) - 1) & ~src
        if G > 2 and i % 2 == 0:
            dst = 1 << 1  # to the "image" group only (VAR)
        gate = None
        if "gate" in kind:
            num = 1 << (G - 1)
            den = (1 << 1) | num
            gate = (num, den, 0.6, 0.05)
        row_start = None
        if "rows" in kind:
            row_start = torch.randint(0, spec.K, (B,), generator=gen).to(device)
        out.append(Move(src, dst, keep.to(device), gate, "rows" in kind, row_start))
    return tuple(out)


def case(spec: Spec, device="cpu", seed: int = 0):
    """(q, k, v, tables or None, mask) for a spec; tensors on `device` in spec.dtype."""
    gen = torch.Generator().manual_seed(seed)
    B, H, Hkv, Q, K, D = spec.B, spec.H, spec.Hkv, spec.Q, spec.K, spec.D
    q = torch.randn(B, Q, H, D, generator=gen) * 1.5  # (B, Q, H, D) memory, viewed as (B, H, Q, D)
    k = torch.randn(B, Hkv, K, D, generator=gen)
    v = torch.randn(B, Hkv, K, D, generator=gen)
    sinks = torch.randint(0, K, (3,), generator=gen)
    k[:, :, sinks] += 2.0 * q.mean((1, 2)).view(B, 1, 1, D)  # strong keys that many rows attend to
    mask, first = _mask(spec, gen, device)
    q, k, v = (t.to(device, spec.dtype) for t in (q, k, v))
    q = q.transpose(1, 2)  # a non-contiguous view, as transformers passes it
    if spec.groups == "none" and spec.scale == "none" and not spec.shift:
        return q, k, v, None, mask
    key_group = _groups(spec, first, gen).to(device) if spec.groups != "none" else None
    G = spec.G if key_group is not None else 1
    bias = None
    if spec.bias:
        bias = torch.randn(H, G, generator=gen) * 1.5
        bias[1] = 0.0
        bias = bias.to(device)
    scale = None
    if spec.scale == "head":
        scale = (torch.rand(H, generator=gen) * 2).to(device)
        scale[0] = 0.0
    elif spec.scale == "batch":
        scale = (torch.rand(B, H, generator=gen) * 2).to(device)
    shift = (torch.randn(H, D, generator=gen) * 0.1).to(device) if spec.shift else None
    moves = _moves(spec, gen, device) if key_group is not None else ()
    tables = LayerTables(key_group, mask.first_key, G, bias, moves, scale, shift)
    return q, k, v, tables, mask


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


CASES = [
    Spec("plain-fp32-gqa4", H=4, Hkv=1),
    Spec("plain-len1", B=1, H=3, Hkv=3, Q=1, K=1),
    Spec(
        "zerotuning-pad-bf16-gqa3",
        H=6,
        Hkv=2,
        dtype=torch.bfloat16,
        mask="pad",
        groups="batch",
        bias=True,
        prefix_only=True,
    ),
    Spec("bias-dense-fp16", H=4, Hkv=4, dtype=torch.float16, mask="dense", groups="batch", G=4, bias=True),
    Spec(
        "act-head-fp16-gqa8", B=1, H=8, Hkv=1, Q=130, K=130, D=32, dtype=torch.float16, groups="head", moves=("plain",)
    ),
    Spec("act-pad-fp32-gqa4", H=4, Hkv=1, mask="pad", groups="head", moves=("plain",), bias=True),
    Spec("var-gate-rows-fp32", H=2, Hkv=2, D=64, groups="batch", G=4, moves=("gate+rows",)),
    Spec("var-dense-bf16", H=3, Hkv=1, dtype=torch.bfloat16, mask="dense", groups="batch", G=4, moves=("gate", "rows")),
    Spec(
        "compose-g8-bf16",
        H=8,
        Hkv=2,
        D=24,
        dtype=torch.bfloat16,
        groups="head",
        G=8,
        bias=True,
        moves=("plain", "gate", "rows"),
        scale="batch",
        shift=True,
    ),
    Spec("scale-head-shift-fp16", H=6, Hkv=2, dtype=torch.float16, mask="pad", scale="head", shift=True),
    Spec("chunk-q7-k37-fp32", H=4, Hkv=1, Q=7, K=37, groups="batch", bias=True, moves=("plain",)),
    Spec(
        "decode-pad-fp32-gqa4",
        H=8,
        Hkv=2,
        Q=1,
        K=130,
        mask="pad",
        groups="head",
        bias=True,
        moves=("plain",),
        scale="head",
    ),
    Spec(
        "decode-dense-bf16-gqa3",
        H=3,
        Hkv=1,
        Q=1,
        K=77,
        D=64,
        dtype=torch.bfloat16,
        mask="dense",
        groups="batch",
        G=4,
        moves=("rows", "gate"),
    ),
    Spec("decode-bias-fp16-gqa1", H=2, Hkv=2, Q=1, K=45, dtype=torch.float16, groups="batch", bias=True, shift=True),
]

COLSUM_CASES = [
    Spec("colsum-plain-fp32", H=4, Hkv=1),
    Spec("colsum-pad-bias-bf16", H=6, Hkv=2, dtype=torch.bfloat16, mask="pad", groups="batch", bias=True),
    Spec("colsum-dense-head-fp16", H=3, Hkv=3, dtype=torch.float16, mask="dense", groups="head", G=4, bias=True),
    Spec("colsum-odd-fp32-gqa8", B=1, H=8, Hkv=1, Q=130, K=130, D=32, groups="batch", bias=True, prefix_only=True),
    Spec("colsum-chunk-q7-k40-pad", H=4, Hkv=2, Q=7, K=40, mask="pad"),
]


def with_dtype(spec: Spec, dtype: torch.dtype) -> Spec:
    return replace(spec, name=f"{spec.name}-{str(dtype).split('.')[-1]}", dtype=dtype)


# --------------------------------------------------------------------------- checks shared by the CPU and GPU tests


def tiles(spec: Spec) -> tuple[int, int, int, int]:
    """Small tiles, so that odd lengths span several tiles (larger for the longer cases: interpreter time)."""
    return (16, 16, 4, 1) if spec.Q < 100 else (32, 32, 4, 1)


def _ref(q, k, v, tables, mask, return_masses=False):
    from attnedit.kernels import reference

    return reference.attention(
        q,
        k,
        v,
        tables,
        scaling=q.shape[-1] ** -0.5,
        mask=mask.dense,
        q_start=mask.q_offset,
        return_masses=return_masses,
    )


def check_attention(ops, spec: Spec, device="cpu", seed=0, **kw) -> dict:
    """Errors of `ops.attention` against the reference, and how much the tables change the reference."""
    q, k, v, tables, mask = case(spec, device, seed)
    ref = _ref(q, k, v, tables, mask)
    out = ops.attention(q, k, v, tables, mask, scaling=q.shape[-1] ** -0.5, **kw)
    plain = _ref(q, k, v, None, mask)
    return dict(
        err=rel_err(out, ref),
        shape=list(out.shape) == list(ref.shape),
        dtype=out.dtype == q.dtype,
        effect=rel_err(plain, ref),
    )


def check_masses(ops, spec: Spec, device="cpu", seed=0, **kw) -> dict:
    q, k, v, tables, mask = case(spec, device, seed)
    ref, ref_m = _ref(q, k, v, tables, mask, return_masses=True)
    out, m = ops.attention(q, k, v, tables, mask, scaling=q.shape[-1] ** -0.5, return_masses=True, **kw)
    return dict(
        err=rel_err(out, ref),
        shape=list(m.shape) == list(ref_m.shape),
        mass_err=(m.double() - ref_m.double()).abs().max().item(),
    )


def check_colsum(ops, spec: Spec, device="cpu", seed=0, **kw) -> dict:
    from attnedit.kernels import reference

    q, k, _, tables, mask = case(spec, device, seed)
    scaling = q.shape[-1] ** -0.5
    ref_s, ref_c = reference.column_scores(q, k, tables, scaling=scaling, mask=mask.dense)
    cs, count = ops.column_scores(q, k, tables, mask, scaling=scaling, **kw)
    return dict(
        err=rel_err(cs, ref_s), count_equal=count.shape == ref_c.shape and bool(torch.equal(count.cpu(), ref_c.cpu()))
    )


def check_inert(ops, device="cpu", **kw) -> dict:
    """Tables whose edits cancel (keep 1, zero bias) must give plain attention; the live ones must not."""
    spec = Spec("inert", H=4, Hkv=2, Q=70, K=70, D=64, groups="head", bias=True, moves=("plain",))
    q, k, v, tables, mask = case(spec, device, 7)
    inert = replace(
        tables,
        bias=torch.zeros_like(tables.bias),
        moves=tuple(replace(m, keep=torch.ones_like(m.keep)) for m in tables.moves),
    )
    out = ops.attention(q, k, v, inert, mask, scaling=0.125, **kw)
    live = ops.attention(q, k, v, tables, mask, scaling=0.125, **kw)
    return dict(inert_err=rel_err(out, _ref(q, k, v, None, mask)), live_err=rel_err(live, _ref(q, k, v, tables, mask)))


def check_fallback(ops, device="cpu") -> dict:
    """Soft-capping runs the reference (bit-identical) and says so once."""
    from attnedit.kernels import reference

    q, k, v, _, mask = case(Spec("softcap", H=2, Hkv=1, Q=9, K=9), device)
    out = ops.attention(q, k, v, None, mask, scaling=0.25, softcap=5.0)
    ref = reference.attention(q, k, v, None, scaling=0.25, softcap=5.0)
    return dict(equal=bool(torch.equal(out, ref)), logged="softcap" in ops._warned)


def plain_with_lse(q, k, v, scaling: float, causal: bool = True):
    """(out (B, H, Q, D), lse (B, H, Q)) of causal (or full) attention in float64: a stand-in for the flash bulk."""
    B, H, Q, D = q.shape
    R = H // k.shape[1]
    kk, vv = k.double().repeat_interleave(R, 1), v.double().repeat_interleave(R, 1)
    s = q.double() @ kk.transpose(-1, -2) * scaling
    if causal:
        s = s.masked_fill(
            torch.ones(Q, k.shape[2], dtype=torch.bool, device=q.device).triu(k.shape[2] - Q + 1), float("-inf")
        )
    lse = torch.logsumexp(s, -1)
    return (torch.softmax(s, -1) @ vv).to(q.dtype), lse.float()


def check_bulk(prefill_mod, ops, spec: Spec, device="cpu", seed=0, config=None) -> dict:
    """The bulk epilogue (flash output + log-sum-exp over all keys, member corrections) and the exact fixup."""
    q, k, v, tables, mask = case(spec, device, seed)
    scaling = q.shape[-1] ** -0.5
    ref = _ref(q, k, v, tables, mask)
    t = ops._Prepared.of(tables, q)
    cfg = config or prefill_mod.pick_config(ops._d_pad(q), q.element_size())
    members = prefill_mod.member_tiles(t.key_group, cfg[1])
    kw = dict(
        scaling=scaling,
        diag=k.shape[2] - q.shape[2],
        q_pos0=mask.q_offset,
        key_group=t.key_group,
        n_groups=t.n_groups,
        bias=t.bias2,
        moves=t.moves,
        scale=t.scale,
        shift=t.shift,
        config=cfg,
    )
    bulk = plain_with_lse(q, k, v, scaling)
    out, _, _, flags = prefill_mod.prefill(q, k, v, members=members, bulk=bulk, **kw)
    before = rel_err(out, ref)
    flagged = flags.float().mean().item()
    prefill_mod.prefill(q, k, v, members=members, only_flagged=flags, out=out, **kw)
    # in place, as after cuDNN (its output laid out (B, Q, H, D)): blocks no edit changes are not rewritten
    stand = bulk[0].transpose(1, 2).contiguous()
    got, _, _, flags2 = prefill_mod.prefill(
        q, k, v, members=members, bulk=(stand.transpose(1, 2), bulk[1]), out=stand, **kw
    )
    prefill_mod.prefill(q, k, v, members=members, only_flagged=flags2, out=got, **kw)
    return dict(
        err=rel_err(out, ref),
        before_fixup=before,
        flagged=flagged,
        in_place_equal=bool(got is stand and torch.equal(got, out) and torch.equal(flags2, flags)),
    )


def var_span_case(spec: Spec, device="cpu", seed=0, n_sparse_after: int = 1):
    """(q, k, v, tables, mask, span): VAR's tables around one image span [s, e), as the runtime gives them.

    Groups: 1 the image's non-sink keys, 2 text sinks (key 0, and `n_sparse_after` keys after the span),
    3 the image's sinks (two keys inside it). One move, VAR's: sinks keep p, the freed mass goes to the
    image's other keys, gated on the image sinks' portion of the image's mass, in rows from e on.
    """
    gen = torch.Generator().manual_seed(seed)
    B, H, Hkv, N, D = spec.B, spec.H, spec.Hkv, spec.Q, spec.D
    s, e = N // 5, N // 5 + N // 4
    q = (torch.randn(B, N, H, D, generator=gen) * 1.5).to(device, spec.dtype).transpose(1, 2)
    k = torch.randn(B, Hkv, N, D, generator=gen)
    v = torch.randn(B, Hkv, N, D, generator=gen)
    g = torch.zeros(B, 1, N, dtype=torch.uint8)
    g[:, :, s:e] = 1
    g[:, :, [s + 1, s + (e - s) // 2]] = 3
    g[:, :, 0] = 2
    after = e + 3 + torch.randperm(N - e - 3, generator=gen)[:n_sparse_after]
    g[:, :, after] = 2
    k[:, :, [0, s + 1]] += 2.0 * q.float().mean((2,)).mean(1, keepdim=True).view(B, 1, 1, D).cpu()  # strong sinks
    k, v = (t.to(device, spec.dtype) for t in (k, v))
    keep = torch.full((H,), 0.6)
    keep[0] = 1.0
    row_start = torch.full((B,), e, dtype=torch.long, device=device)
    move = Move(0b1100, 0b0010, keep.to(device), (0b1000, 0b1010, 0.5, 0.2), True, row_start)
    first = torch.zeros(B, dtype=torch.long, device=device)
    tables = LayerTables(g.to(device), first, 4, None, (move,), None, None, image_span=(s, e))
    mask = MaskInfo(None, 0, 0, None, first)
    return q, k, v, tables, mask, (s, e)


def check_split(ops, prefill_mod, spec: Spec, device="cpu", seed=0, n_sparse_after: int = 1) -> dict:
    """The split path (flash parts around the image span, combined by `triton_split`) against the reference."""
    q, k, v, tables, mask, span = var_span_case(spec, device, seed, n_sparse_after)
    scaling = q.shape[-1] ** -0.5
    ref = _ref(q, k, v, tables, mask)
    t = ops._Prepared.of(tables, q)
    cfg = prefill_mod.pick_config(ops._d_pad(q), q.element_size())
    members = prefill_mod.member_tiles(t.key_group, cfg[1])
    kw = dict(scaling=scaling, diag=0, q_pos0=0, kv_start=None, dense=None, scale=None, shift=None)
    kw.update(key_group=t.key_group, n_groups=t.n_groups, bias=None, moves=t.moves, config=None)
    fixups = []
    real = prefill_mod.prefill

    def counting(*args, **kwargs):
        if kwargs.get("only_flagged") is not None:
            fixups.append(kwargs["only_flagged"].float().mean().item())
        return real(*args, **kwargs)

    ops._prefill = counting
    try:
        out = ops._split_at_span(q, k, v, t, span, scaling, members, kw, flash=plain_with_lse)
    finally:
        ops._prefill = real
    plain = plain_with_lse(q, k, v, scaling)[0].transpose(1, 2)
    return dict(
        err=rel_err(out, ref),
        edited=rel_err(plain, ref),  # how far the edit moves the output: the test's scale
        flagged=fixups[0] if fixups else -1.0,
    )


def check_split_attention(ops, spec: Spec, device="cuda", seed=0, n_sparse_after: int = 1) -> dict:
    """`ops.attention` on tables with an image span (the flash pieces and the combining kernel on CUDA)."""
    q, k, v, tables, mask, span = var_span_case(spec, device, seed, n_sparse_after)
    ref = _ref(q, k, v, tables, mask)
    calls = []
    real, min_rows = ops._combine, ops.SPLIT_MIN_ROWS
    ops._combine = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    ops.SPLIT_MIN_ROWS = 0  # these cases are shorter than the split's production threshold
    try:
        out = ops.attention(q, k, v, tables, mask, scaling=q.shape[-1] ** -0.5)
    finally:
        ops._combine, ops.SPLIT_MIN_ROWS = real, min_rows
    fused = ops.attention(q, k, v, tables, mask, scaling=q.shape[-1] ** -0.5, path="fused")
    return dict(
        err=rel_err(out, ref),
        err_fused=rel_err(fused, ref),  # the fused kernel's rounding in the same dtype: the scale of err
        edited=rel_err(_ref(q, k, v, None, mask), ref),
        split=len(calls) == 1,
    )


def check_member_list(prefill_mod, device="cpu") -> dict:
    """The member-tile lists against a plain PyTorch construction (odd K, empty rows, every tile flagged)."""
    gen = torch.Generator().manual_seed(4)
    ok = True
    for K, bn, density in ((1, 16, 1.0), (37, 16, 0.05), (300, 64, 0.01), (130, 16, 1.0), (129, 32, 0.0)):
        g = (torch.rand(2, 3, K, generator=gen) < density).to(torch.uint8) * 3
        lst, cnt = prefill_mod.member_tiles(g.to(device), bn)
        nT = -(-K // bn)
        has = torch.nn.functional.pad(g != 0, (0, nT * bn - K)).view(2, 3, nT, bn).any(-1)
        for b in range(2):
            for h in range(3):
                want = has[b, h].nonzero().flatten().tolist()
                got = lst[b, h].cpu().tolist()
                ok &= int(cnt[b, h]) == len(want) and got[: len(want)] == want
                ok &= all(x == prefill_mod.SENTINEL for x in got[len(want) :]) and len(got) == nT + 1
    return dict(ok=bool(ok))


BULK_CASES = [
    Spec(
        "bulk-act-bf16-gqa4", B=1, H=4, Hkv=1, Q=70, K=70, D=32, dtype=torch.bfloat16, groups="head", moves=("plain",)
    ),
    Spec(
        "bulk-var-fp16-gqa3",
        B=1,
        H=3,
        Hkv=1,
        Q=70,
        K=70,
        D=32,
        dtype=torch.float16,
        groups="batch",
        G=4,
        moves=("gate+rows",),
    ),
    Spec(
        "bulk-bias-bf16",
        B=2,
        H=2,
        Hkv=2,
        Q=37,
        K=37,
        dtype=torch.bfloat16,
        groups="batch",
        bias=True,
        scale="head",
        shift=True,
    ),
]
SPLIT_CASES = [
    Spec("split-var-fp16-gqa2", B=2, H=4, Hkv=2, Q=150, K=150, D=32, dtype=torch.float16),
    Spec("split-var-bf16", B=1, H=3, Hkv=1, Q=100, K=100, D=64, dtype=torch.bfloat16),
    Spec("split-var-fp32-overflow", B=1, H=2, Hkv=1, Q=200, K=200, D=16, extra={"sparse_after": 70}),
]
MASS_CASES = [CASES[4], CASES[7], CASES[12]]
DECODE_CASES = [c for c in CASES if c.Q == 1 and c.K > 1]
