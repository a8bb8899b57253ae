"""Key-group edits around one image span: flash calls on the span's pieces, then one combining kernel.

When a layer's edits leave every row before the end `e` of an image span [s, e) alone (VAR: its
moves edit rows after the image, with no bias) and the span is the same in every batch row, the
flash bulk need not see the span's keys with the rest: `triton_ops` runs torch's cuDNN attention
on three pieces of the causal map,

- rows [0, e) over keys [0, e), causal: those rows' output as it stands;
- rows [e, N) over keys [e, N), causal (with its log-sum-exp);
- rows [e, N) over the span's keys [s, e) (with its log-sum-exp): the span's mass and output per row;

and `combine` adds the keys [0, s) itself, merges the three by their log-sum-exps, and applies the
edit from the group masses. A group's mass is the span's (for the span's own group: the one most
of its keys are in) less the span's other keys, plus the *sparse* member keys: every key of a
group other than 0 outside the span, and every key inside it not of the span's group (VAR's
sinks). Those are listed per (batch row, key-group head) by `sparse_keys`, at most `CAP`; rows of
a list that overflows are flagged, like rows whose bulk rounding the edit amplifies more than
`ALPHA_MAX`, for the exact recomputation by the fused kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    Launcher,
    cdiv,
    dot_pv,
    dot_qk,
    emulate_bf16,
    key_coef,
    move_coefficients,
    next_pow2,
    placeholders,
)

LOG2E = tl.constexpr(1.4426950408889634)
LOG2E_F = 1.4426950408889634
CAP = 64  # sparse member keys kept per (batch row, key-group head)
SPARSE_N = 16  # sparse keys per matrix product
ALPHA_MAX = 2.0  # as the bulk epilogue's (`triton_prefill.ALPHA_MAX`)
# (BLOCK_M, BLOCK_N for the keys before the span, num_warps) per padded head_dim
TILES = {64: (64, 64, 4), 128: (64, 64, 4), 256: (32, 32, 4)}


@triton.jit
def _sparse_kernel(
    KG,
    LIST,
    COUNT,
    GSPAN,
    stride_gb,
    stride_gh,
    HG,
    NK,
    S0,
    S1,
    G: tl.constexpr,
    GP: tl.constexpr,
    CAP_: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per (batch row, key-group head): the span's group, and the sparse member keys, ascending."""
    row = tl.program_id(0)
    KG_ROW = KG + (row // HG).to(tl.int64) * stride_gb + (row % HG) * stride_gh
    offs = tl.arange(0, BLOCK)
    cols_g = tl.arange(0, GP)
    hist = tl.zeros([GP], tl.int32)
    for c in range(S0, S1, BLOCK):
        cols = c + offs
        inside = cols < S1
        kg = tl.load(KG_ROW + cols, mask=inside, other=0).to(tl.int32)
        for g in tl.static_range(G):
            hist = tl.where(cols_g == g, hist + tl.sum((inside & (kg == g)).to(tl.int32), 0), hist)
    gspan = tl.argmax(tl.where(cols_g < G, hist, -1), 0).to(tl.int32)
    cnt = row * 0
    for c in range(0, NK, BLOCK):
        cols = c + offs
        valid = cols < NK
        kg = tl.load(KG_ROW + cols, mask=valid, other=0).to(tl.int32)
        inside = (cols >= S0) & (cols < S1)
        sparse = valid & tl.where(inside, kg != gspan, kg != 0)
        pos = cnt + tl.cumsum(sparse.to(tl.int32), 0) - 1
        tl.store(LIST + row.to(tl.int64) * CAP_ + pos, cols, mask=sparse & (pos < CAP_))
        cnt += tl.sum(sparse.to(tl.int32), 0)
    tl.store(COUNT + row, cnt)
    tl.store(GSPAN + row, gspan)


_LAUNCH_SPARSE = Launcher(_sparse_kernel)


def sparse_keys(key_group: torch.Tensor, span: tuple[int, int], n_groups: int):
    """(list (B, Hg, CAP) int32, count (B, Hg) int32 (may exceed CAP), span group (B, Hg) int32), one launch."""
    B, Hg, K = key_group.shape
    dev = key_group.device
    lst = torch.zeros(B, Hg, CAP, dtype=torch.int32, device=dev)
    count = torch.empty(B, Hg, dtype=torch.int32, device=dev)
    gspan = torch.empty(B, Hg, dtype=torch.int32, device=dev)
    args = (key_group, lst, count, gspan, key_group.stride(0), key_group.stride(1), Hg, K, span[0], span[1])
    consts = dict(G=n_groups, GP=max(2, next_pow2(n_groups)), CAP_=CAP, BLOCK=1024)
    _LAUNCH_SPARSE((B * Hg,), args, consts, 4)
    return lst, count, gspan


@triton.jit
def _sparse_weights(
    q,
    K_BASE,
    KG_ROW,
    LIST_ROW,
    c,
    n_sp,
    rows,
    lt,
    offs_d,
    qk_scale,
    stride_kn,
    S0,
    S1,
    HEAD_DIM: tl.constexpr,
    SN: tl.constexpr,
    IEEE: tl.constexpr,
    EMU: tl.constexpr,
):
    """Sparse keys c .. c + SN of the list: their indices, groups, whether inside the span, and A (ROWS, SN)."""
    j = c + tl.arange(0, SN)
    listed = j < n_sp
    idx = tl.load(LIST_ROW + j, mask=listed, other=0)
    k = tl.load(
        K_BASE + idx[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
        mask=listed[:, None] & (offs_d < HEAD_DIM)[None, :],
        other=0.0,
    )
    kg = tl.load(KG_ROW + idx, mask=listed, other=0).to(tl.int32)
    s = dot_qk(q, tl.trans(k), IEEE, EMU) * qk_scale
    seen = listed[None, :] & (idx[None, :] <= rows[:, None])
    a = tl.where(seen, tl.math.exp2(s - lt[:, None]), 0.0)
    return idx, kg, (idx >= S0) & (idx < S1), a


@triton.jit
def _combine_kernel(
    Q,
    K,
    V,
    OUT,
    FLAGS,
    KG,
    LIST,
    COUNT,
    GSPAN,
    OB,
    LB,
    OC,
    LC,
    MV_I,
    MV_F,
    KEEP,
    ROW_START,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_om,
    stride_oh,
    stride_gb,
    stride_gh,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_lbb,
    stride_lbh,
    stride_cb,
    stride_ch,
    stride_cm,
    stride_lcb,
    stride_lch,
    B,
    H,
    R,
    NQ,
    E,
    S0,
    S1,
    Q_POS0,
    qk_scale,
    ALPHA_MAX_,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HG_PER_HEAD: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    NM: tl.constexpr,
    CAP_: tl.constexpr,
    SN: tl.constexpr,
    IEEE: tl.constexpr,
    EMU: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // R
    hg = h if HG_PER_HEAD else 0
    n_hg = H if HG_PER_HEAD else 1
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows after the span's end, from E
    rows = E + offs_m
    rmask = rows < NQ
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < HEAD_DIM
    cols_g = tl.arange(0, GP)
    q = tl.load(
        Q + b.to(tl.int64) * stride_qb + h * stride_qh + rows[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
        mask=rmask[:, None] & dmask[None, :],
        other=0.0,
    )
    K_BASE = K + b.to(tl.int64) * stride_kb + kvh * stride_kh
    V_BASE = V + b.to(tl.int64) * stride_vb + kvh * stride_vh
    KG_ROW = KG + b.to(tl.int64) * stride_gb + hg * stride_gh
    lrow = b * n_hg + hg
    LIST_ROW = LIST + lrow.to(tl.int64) * CAP_
    cnt = tl.load(COUNT + lrow)
    n_sp = tl.minimum(cnt, CAP_)
    gspan = tl.load(GSPAN + lrow)

    # the keys before the span, which no flash call saw: an online softmax over their tiles
    m_p = tl.zeros([BLOCK_M], tl.float32) - float("inf")
    l_p = tl.zeros([BLOCK_M], tl.float32)
    acc_p = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for n in range(0, S0, BLOCK_N):
        cols = n + offs_n
        kv_mask = (cols < S0)[:, None] & dmask[None, :]
        k = tl.load(K_BASE + cols[:, None].to(tl.int64) * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.where((cols < S0)[None, :], dot_qk(q, tl.trans(k), IEEE, EMU) * qk_scale, float("-inf"))
        m_new = tl.maximum(m_p, tl.max(s, 1))
        alpha = tl.math.exp2(m_p - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_p = l_p * alpha + tl.sum(p, 1)
        v = tl.load(V_BASE + cols[:, None].to(tl.int64) * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc_p = dot_pv(p, v, acc_p * alpha[:, None], IEEE, EMU)
        m_p = m_new

    # the three parts' log2-sum-exps merged: each part's share of the row
    lb = tl.load(LB + b.to(tl.int64) * stride_lbb + h * stride_lbh + offs_m, mask=rmask, other=0.0) * LOG2E
    lc = tl.load(LC + b.to(tl.int64) * stride_lcb + h * stride_lch + offs_m, mask=rmask, other=0.0) * LOG2E
    lp = tl.where(l_p > 0, m_p + tl.math.log2(tl.where(l_p > 0, l_p, 1.0)), float("-inf"))
    top = tl.maximum(tl.maximum(lb, lc), lp)
    lt = top + tl.math.log2(tl.math.exp2(lb - top) + tl.math.exp2(lc - top) + tl.math.exp2(lp - top))
    w_b = tl.math.exp2(lb - lt)
    w_c = tl.math.exp2(lc - lt)  # the span's mass
    w_p = tl.where(l_p > 0, tl.math.exp2(m_p - lt), 0.0)  # acc_p is unnormalised at m_p

    # group masses: the sparse keys' own, the span's group the span's mass less its sparse keys
    U = tl.zeros([BLOCK_M, GP], tl.float32)
    in_span = tl.zeros([BLOCK_M], tl.float32)
    for c in range(0, n_sp, SN):
        idx, kg, inside, a = _sparse_weights(
            q, K_BASE, KG_ROW, LIST_ROW, c, n_sp, rows, lt, offs_d, qk_scale, stride_kn, S0, S1, HEAD_DIM, SN, IEEE, EMU
        )
        for g in tl.static_range(1, G):
            U = tl.where((cols_g == g)[None, :], U + tl.sum(tl.where((kg == g)[None, :], a, 0.0), 1)[:, None], U)
        in_span += tl.sum(tl.where(inside[None, :], a, 0.0), 1)
    U = tl.where(((cols_g == gspan) & (cols_g > 0))[None, :], U + (w_c - in_span)[:, None], U)
    u0 = tl.maximum(1.0 - tl.sum(U, 1), 0.0)
    W = U + tl.where((cols_g == 0)[None, :], u0[:, None], 0.0)
    L = tl.sum(W, 1)
    inv = 1.0 / tl.where(L > 0, L, 1.0)
    mass = W * inv[:, None]
    coefs = move_coefficients(
        mass, h + tl.zeros_like(offs_m), Q_POS0 + rows.to(tl.int64), b, MV_I, MV_F, KEEP, ROW_START, H, B, NM, GP
    )
    c0 = tl.sum(tl.where((cols_g == 0)[None, :], coefs, 0.0), 1)
    coef = tl.where((cols_g == 0)[None, :], 0.0, (coefs - c0[:, None]) * inv[:, None])
    fac = c0 * inv
    coef_span = tl.sum(tl.where((cols_g == gspan)[None, :], coef, 0.0), 1)

    o_b = tl.load(
        OB + b.to(tl.int64) * stride_bb + h * stride_bh + offs_m[:, None].to(tl.int64) * stride_bm + offs_d[None, :],
        mask=rmask[:, None] & dmask[None, :],
        other=0.0,
    ).to(tl.float32)
    o_c = tl.load(
        OC + b.to(tl.int64) * stride_cb + h * stride_ch + offs_m[:, None].to(tl.int64) * stride_cm + offs_d[None, :],
        mask=rmask[:, None] & dmask[None, :],
        other=0.0,
    ).to(tl.float32)
    acc = (o_b * w_b[:, None] + acc_p * w_p[:, None]) * fac[:, None] + o_c * (w_c * (fac + coef_span))[:, None]
    if tl.max(tl.max(tl.abs(coef), 1), 0) > 0:  # some row of this block is edited: the sparse keys' own terms
        for c in range(0, n_sp, SN):
            idx, kg, inside, a = _sparse_weights(
                q,
                K_BASE,
                KG_ROW,
                LIST_ROW,
                c,
                n_sp,
                rows,
                lt,
                offs_d,
                qk_scale,
                stride_kn,
                S0,
                S1,
                HEAD_DIM,
                SN,
                IEEE,
                EMU,
            )
            w = a * (key_coef(coef, kg, G, GP, 1) - tl.where(inside[None, :], coef_span[:, None], 0.0))
            v = tl.load(
                V_BASE + idx[:, None].to(tl.int64) * stride_vn + offs_d[None, :],
                mask=(c + tl.arange(0, SN) < n_sp)[:, None] & dmask[None, :],
                other=0.0,
            )
            acc = dot_pv(w, v, acc, IEEE, EMU)
    flagged = (fac > ALPHA_MAX_) | (cnt > CAP_)
    tl.store(FLAGS + bh.to(tl.int64) * NQ + rows, flagged.to(tl.int8), mask=rmask)
    tl.store(
        OUT + b.to(tl.int64) * stride_ob + rows[:, None].to(tl.int64) * stride_om + h * stride_oh + offs_d[None, :],
        acc.to(OUT.dtype.element_ty),
        mask=rmask[:, None] & dmask[None, :],
    )


_LAUNCH = Launcher(_combine_kernel)


def combine(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scaling: float,
    span: tuple[int, int],
    q_pos0: int,
    key_group: torch.Tensor,
    n_groups: int,
    moves: tuple | None,
    after: tuple[torch.Tensor, torch.Tensor],
    image: tuple[torch.Tensor, torch.Tensor],
    out: torch.Tensor,
    flags: torch.Tensor,
) -> None:
    """Rows [e, N) of `out` from the two flash parts of those rows, the keys before the span and the edit.

    Args:
        q: (B, H, N, D); k, v: (B, Hkv, N, D); last dims contiguous; causal, Q == K, no padding.
        span: (s, e), 0 <= s < e < N.
        key_group: (B, Hg, N) uint8, last dim contiguous; n_groups: G.
        moves: packed moves (`triton_prefill.prefill`'s form), all of whose row starts are at least e.
        after: (out (B, H, N - e, D), lse (B, H, N - e) natural log) of rows [e, N) over keys [e, N), causal.
        image: the same over the span's keys [s, e), not causal.
        out: (B, N, H, D): rows [e, N) are written.
        flags: (B, H, N) int8: rows [e, N) are written (1: recompute exactly).
    """
    B, H, N, D = q.shape
    s0, e = span
    d_pad = max(16, next_pow2(D))
    BM, BN, warps = TILES[64 if d_pad <= 64 else d_pad]
    dummy, dummy_f, _ = placeholders(q.device)
    lst, count, gspan = sparse_keys(key_group, span, n_groups)
    mv_i, mv_f, keep, row_start = moves if moves else (dummy, dummy_f, dummy_f, dummy)
    ob, lb = after
    oc, lc = image
    args = (
        q,
        k,
        v,
        out,
        flags,
        key_group,
        lst,
        count,
        gspan,
        ob,
        lb,
        oc,
        lc,
        mv_i,
        mv_f,
        keep,
        row_start,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *out.stride()[:3],
        key_group.stride(0),
        key_group.stride(1),
        *ob.stride()[:3],
        lb.stride(0),
        lb.stride(1),
        *oc.stride()[:3],
        lc.stride(0),
        lc.stride(1),
        B,
        H,
        H // k.shape[1],
        N,
        e,
        s0,
        e,
        q_pos0,
        scaling * LOG2E_F,
        ALPHA_MAX,
    )
    consts = dict(
        HEAD_DIM=D,
        D_PAD=d_pad,
        BLOCK_M=BM,
        BLOCK_N=BN,
        HG_PER_HEAD=key_group.shape[1] > 1,
        G=n_groups,
        GP=max(2, next_pow2(n_groups)),
        NM=mv_i.shape[0] if moves else 0,
        CAP_=CAP,
        SN=SPARSE_N,
        IEEE=q.dtype == torch.float32,
        EMU=emulate_bf16(q.dtype),
    )
    _LAUNCH((cdiv(N - e, BM), B * H), args, consts, warps, 1)
