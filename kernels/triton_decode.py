"""Decode attention: one new query row over a long KV cache, split over the keys, merged by log-sum-exp.

`_decode_kernel`: one program per (key split, batch row, KV head) holds the R
query heads that share the KV head as the rows of its tiles, so each K/V tile
is read once for all of them. It keeps the running max and, per key group
(only when moves or masses need them), the exp-weight sums l_g and outputs
O_g over its split, with biased logits. Decoding is memory-bound: the extra
per-group work costs no time.

`_combine_kernel`: one program per (batch row, KV head) merges the splits by
log-sum-exp, forms the group masses, applies the moves
(o = sum_g c_g O_g / sum_g l_g), the output scale and shift.

With one split (short caches: `n_splits` asks for at least 512 keys a split)
the decode kernel finishes its rows itself (``FINISH``): one launch instead of
two and no partial-sum buffers. The merge of a single split multiplies by
exp2(0) = 1, so both ways give the same bits.
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
    finish_rows,
    move_coefficients,
    next_pow2,
    placeholders,
    sm_count,
)

BLOCK_N = 64  # keys per tile; splits hold whole tiles


@triton.jit
def _decode_kernel(
    Q,
    K,
    V,
    KG,
    BIAS,
    KV_START,
    DM,
    POS,
    PO,
    PL,
    PM,
    OUT,
    MASSES,
    MV_I,
    MV_F,
    KEEP,
    ROW_START,
    SCALE,
    SHIFT,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_gb,
    stride_gh,
    stride_db,
    stride_ob,
    stride_oh,
    B,
    H,
    HKV,
    R,
    NK,
    DIAG,
    Q_POS,
    KEYS_PER_SPLIT,
    S,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_MODE: tl.constexpr,
    HAS_KV_START: tl.constexpr,
    POS_ON_DEVICE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    HG_PER_HEAD: tl.constexpr,
    G: tl.constexpr,
    NG: tl.constexpr,
    IEEE: tl.constexpr,
    EMU: tl.constexpr,
    FINISH: tl.constexpr,
    NM: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    WRITE_MASSES: tl.constexpr,
):
    split = tl.program_id(0)
    bk = tl.program_id(1)
    b = bk // HKV
    kvh = bk % HKV
    rows = tl.arange(0, BLOCK_R)
    rmask = rows < R
    heads = kvh * R + tl.where(rmask, rows, 0)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    dmask = (offs_d < HEAD_DIM)[None, :]
    q = tl.load(
        Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=rmask[:, None] & dmask,
        other=0.0,
    )
    K_BASE = K + b.to(tl.int64) * stride_kb + kvh * stride_kh
    V_BASE = V + b.to(tl.int64) * stride_vb + kvh * stride_vh
    n0 = split * KEYS_PER_SPLIT
    n1 = tl.minimum(NK, n0 + KEYS_PER_SPLIT)
    ks = tl.load(KV_START + b) if HAS_KV_START else b * 0
    diag = DIAG + tl.load(POS).to(tl.int32) if POS_ON_DEVICE else DIAG + b * 0
    n1 = tl.minimum(n1, diag + 1)  # no key after the query row (its cache slots may be unwritten)
    if MASK_MODE == 0:
        n0 = tl.maximum(n0, (ks // BLOCK_N) * BLOCK_N)
    g_ids = tl.arange(0, NG)
    m_i = tl.zeros([BLOCK_R], tl.float32) - float("inf")
    l_g = tl.zeros([BLOCK_R, NG], tl.float32)
    acc = tl.zeros([BLOCK_R * NG, D_PAD], tl.float32)
    for n in range(n0, n1, BLOCK_N):
        cols = n + offs_n
        kin = cols < n1
        k = tl.load(K_BASE + cols[:, None] * stride_kn + offs_d[None, :], mask=kin[:, None] & dmask, other=0.0)
        v = tl.load(V_BASE + cols[:, None] * stride_vn + offs_d[None, :], mask=kin[:, None] & dmask, other=0.0)
        s = dot_qk(q, tl.trans(k), IEEE, EMU) * qk_scale
        if MASK_MODE == 0:
            vis = kin & (cols >= ks) & (cols <= diag)
        else:
            vis = kin & (tl.load(DM + b.to(tl.int64) * stride_db + cols, mask=kin, other=0) != 0)
        if HAS_GROUPS:
            if HG_PER_HEAD:
                kg = tl.load(
                    KG + b.to(tl.int64) * stride_gb + heads[:, None] * stride_gh + cols[None, :],
                    mask=kin[None, :],
                    other=0,
                ).to(tl.int32)
            else:
                kg = tl.broadcast_to(
                    tl.load(KG + b.to(tl.int64) * stride_gb + cols, mask=kin, other=0).to(tl.int32)[None, :],
                    (BLOCK_R, BLOCK_N),
                )
            if HAS_BIAS:
                for g in tl.static_range(G):
                    s = s + tl.where(kg == g, tl.load(BIAS + heads * G + g)[:, None], 0.0)
        s = tl.where(vis[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        if NG == 1:
            l_g = l_g * alpha[:, None] + tl.sum(p, 1)[:, None]
            pg = p
            alpha_g = alpha
        else:  # rows r*NG + g hold group g of head r
            p3 = tl.where(kg[:, None, :] == g_ids[None, :, None], p[:, None, :], 0.0)
            l_g = l_g * alpha[:, None] + tl.sum(p3, 2)
            pg = tl.reshape(p3, (BLOCK_R * NG, BLOCK_N))
            alpha_g = tl.reshape(tl.broadcast_to(alpha[:, None], (BLOCK_R, NG)), (BLOCK_R * NG,))
        acc = acc * alpha_g[:, None]
        acc = dot_pv(pg, v, acc, IEEE, EMU)
        m_i = m_new
    o3 = tl.reshape(acc, (BLOCK_R, NG, D_PAD))
    if FINISH:  # the only split: no merge
        _epilogue(
            o3,
            l_g,
            b,
            heads,
            rmask,
            OUT,
            MASSES,
            MV_I,
            MV_F,
            KEEP,
            ROW_START,
            SCALE,
            SHIFT,
            POS,
            stride_ob,
            stride_oh,
            B,
            H,
            Q_POS,
            HEAD_DIM,
            D_PAD,
            NG,
            G,
            NM,
            SCALE_MODE,
            HAS_SHIFT,
            WRITE_MASSES,
            POS_ON_DEVICE,
        )
    else:
        part = ((b * H + heads) * S + split).to(tl.int64)  # (BLOCK_R,) index of this (row, split)
        tl.store(PM + part, m_i, mask=rmask)
        tl.store(PL + part[:, None] * NG + g_ids[None, :], l_g, mask=rmask[:, None])
        tl.store(
            PO + (part[:, None, None] * NG + g_ids[None, :, None]) * D_PAD + offs_d[None, None, :],
            o3,
            mask=rmask[:, None, None],
        )


@triton.jit
def _epilogue(
    o_g,
    l_g,
    b,
    heads,
    rmask,
    OUT,
    MASSES,
    MV_I,
    MV_F,
    KEEP,
    ROW_START,
    SCALE,
    SHIFT,
    POS,
    stride_ob,
    stride_oh,
    B,
    H,
    Q_POS,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    NG: tl.constexpr,
    G: tl.constexpr,
    NM: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    WRITE_MASSES: tl.constexpr,
    POS_ON_DEVICE: tl.constexpr,
):
    """Rows' group sums l_g (BLOCK_R, NG) and outputs o_g (BLOCK_R, NG, D_PAD) -> masses, moves, scale, shift, OUT."""
    g_ids = tl.arange(0, NG)
    offs_d = tl.arange(0, D_PAD)
    L = tl.sum(l_g, 1)
    if NG > 1:
        mass = l_g / tl.where(L > 0, L, 1.0)[:, None]
        q_pos = Q_POS + tl.load(POS) if POS_ON_DEVICE else Q_POS + b.to(tl.int64) * 0
        c = move_coefficients(
            mass, heads, q_pos + tl.zeros(L.shape, tl.int64), b, MV_I, MV_F, KEEP, ROW_START, H, B, NM, NG
        )
        acc = tl.sum(o_g * c[:, :, None], 1)
        if WRITE_MASSES:
            tl.store(
                MASSES + (b * H + heads)[:, None] * G + g_ids[None, :], mass, mask=rmask[:, None] & (g_ids < G)[None, :]
            )
    else:
        acc = tl.sum(o_g, 1)
        if WRITE_MASSES:
            tl.store(
                MASSES + (b * H + heads)[:, None] * G + g_ids[None, :],
                tl.where(L > 0, 1.0, 0.0)[:, None] + tl.zeros(l_g.shape, tl.float32),
                mask=rmask[:, None] & (g_ids < G)[None, :],
            )
    o = finish_rows(acc, L, heads, b, offs_d, SCALE, SHIFT, H, HEAD_DIM, SCALE_MODE, HAS_SHIFT)
    tl.store(
        OUT + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
        o.to(OUT.dtype.element_ty),
        mask=rmask[:, None] & (offs_d < HEAD_DIM)[None, :],
    )


@triton.jit
def _combine_kernel(
    PO,
    PL,
    PM,
    OUT,
    MASSES,
    MV_I,
    MV_F,
    KEEP,
    ROW_START,
    SCALE,
    SHIFT,
    POS,
    stride_ob,
    stride_oh,
    B,
    H,
    HKV,
    R,
    S,
    Q_POS,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    NG: tl.constexpr,
    G: tl.constexpr,
    NM: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    WRITE_MASSES: tl.constexpr,
    POS_ON_DEVICE: tl.constexpr,
):
    bk = tl.program_id(0)
    b = bk // HKV
    kvh = bk % HKV
    rows = tl.arange(0, BLOCK_R)
    rmask = rows < R
    heads = kvh * R + tl.where(rmask, rows, 0)
    g_ids = tl.arange(0, NG)
    offs_d = tl.arange(0, D_PAD)
    base = (b * H + heads) * S  # (BLOCK_R,)
    m = tl.zeros([BLOCK_R], tl.float32) - float("inf")
    for s in range(0, S):
        m = tl.maximum(m, tl.load(PM + base + s))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    l_g = tl.zeros([BLOCK_R, NG], tl.float32)
    o_g = tl.zeros([BLOCK_R, NG, D_PAD], tl.float32)
    for s in range(0, S):
        part = (base + s).to(tl.int64)
        a = tl.math.exp2(tl.load(PM + part) - m_use)
        l_g += a[:, None] * tl.load(PL + part[:, None] * NG + g_ids[None, :])
        o_g += a[:, None, None] * tl.load(
            PO + (part[:, None, None] * NG + g_ids[None, :, None]) * D_PAD + offs_d[None, None, :]
        )
    _epilogue(
        o_g,
        l_g,
        b,
        heads,
        rmask,
        OUT,
        MASSES,
        MV_I,
        MV_F,
        KEEP,
        ROW_START,
        SCALE,
        SHIFT,
        POS,
        stride_ob,
        stride_oh,
        B,
        H,
        Q_POS,
        HEAD_DIM,
        D_PAD,
        NG,
        G,
        NM,
        SCALE_MODE,
        HAS_SHIFT,
        WRITE_MASSES,
        POS_ON_DEVICE,
    )


_LAUNCH_DECODE = Launcher(_decode_kernel)
_LAUNCH_COMBINE = Launcher(_combine_kernel)


def n_splits(n_keys: int, n_programs: int, n_sm: int) -> int:
    """Key splits: about two programs per multiprocessor, at least 512 keys per split.

    More splits than that lose more in the combine (which walks the splits one by one) than they
    gain in parallelism (benchmarks/bench_attention.py --sweep-decode, H100).
    """
    want = max(1, (2 * n_sm + n_programs - 1) // n_programs)
    return max(1, min(want, n_keys // 512))


def decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scaling: float,
    diag: int,
    q_pos: int,
    pos: torch.Tensor | None = None,
    kv_start: torch.Tensor | None = None,
    dense: torch.Tensor | None = None,
    key_group: torch.Tensor | None = None,
    n_groups: int = 1,
    bias: torch.Tensor | None = None,
    per_group: bool = False,
    moves: tuple | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    write_masses: bool = False,
    splits: int | None = None,
    block_n: int = BLOCK_N,
    num_stages: int = 3,
):
    """Launch decode + combine for one query row.

    Args:
        q: (B, H, 1, D); k, v: (B, Hkv, K, D); last dims contiguous.
        diag: key j is visible iff kv_start[b] <= j <= diag (causal mode); no key after diag is read.
        q_pos: absolute position of the query row (row starts of moves).
        pos: (1,) int64 on the device, added to both `diag` and `q_pos` when given: the query's position
            as a static cache keeps it, read by the kernels so that a captured CUDA graph replays right.
        dense: (B, 1, 1, K) uint8 mask, or None.
        key_group, n_groups, bias (H, G) log2-domain, moves, scale, shift: as `triton_prefill.prefill`.
        per_group: keep per-group partial sums (moves or masses need them).
        splits: key splits override; block_n, num_stages: tile shape and pipelining (benchmark sweeps).
    Returns:
        (out (B, 1, H, D), masses (B, H, 1, G) or None).
    """
    B, H, _, D = q.shape
    Hkv, NK = k.shape[1], k.shape[2]
    R = H // Hkv
    dev = q.device
    d_pad = max(16, next_pow2(D))
    block_r = max(16, next_pow2(R))
    G = n_groups
    NG = max(2, next_pow2(G)) if per_group else 1
    S = splits or (1 if NK < 1024 else n_splits(NK, B * Hkv, sm_count(dev)))  # n_splits gives 1 below 1024 keys
    kps = cdiv(cdiv(NK, S), block_n) * block_n
    S = cdiv(NK, kps)
    finish = S == 1  # one launch: the decode kernel finishes its rows itself
    dummy, dummy_f, dummy_u8 = placeholders(dev)
    out = torch.empty(B, 1, H, D, dtype=q.dtype, device=dev)
    masses = torch.empty(B, H, 1, G, dtype=torch.float32, device=dev) if write_masses else None
    if finish:
        po = pl = pm = dummy_f
    else:
        po = torch.empty(B, H, S, NG, d_pad, dtype=torch.float32, device=dev)
        pl = torch.empty(B, H, S, NG, dtype=torch.float32, device=dev)
        pm = torch.empty(B, H, S, dtype=torch.float32, device=dev)
    kg = key_group if key_group is not None else dummy_u8.view(1, 1, 8)
    dm = dense if dense is not None else dummy_u8.view(1, 1, 1, 8)
    mv_i, mv_f, keep, row_start = moves if moves else (dummy, dummy_f, dummy_f, dummy)
    q_st, k_st, v_st, kg_st, dm_st, out_st = (t.stride() for t in (q, k, v, kg, dm, out))
    masses_arg = masses if masses is not None else dummy_f
    scale_arg = scale if scale is not None else dummy_f
    shift_arg = shift if shift is not None else dummy_f
    pos_arg = pos if pos is not None else dummy
    finish_consts = dict(
        NM=mv_i.shape[0] if moves else 0,
        SCALE_MODE=0 if scale is None else scale.dim(),
        HAS_SHIFT=shift is not None,
        WRITE_MASSES=write_masses,
    )
    args = (
        q,
        k,
        v,
        kg,
        bias if bias is not None else dummy_f,
        kv_start if kv_start is not None else dummy,
        dm,
        pos_arg,
        po,
        pl,
        pm,
        out,
        masses_arg,
        mv_i,
        mv_f,
        keep,
        row_start,
        scale_arg,
        shift_arg,
        q_st[0],
        q_st[1],
        k_st[0],
        k_st[1],
        k_st[2],
        v_st[0],
        v_st[1],
        v_st[2],
        kg_st[0],
        kg_st[1],
        dm_st[0],
        out_st[0],
        out_st[2],
        B,
        H,
        Hkv,
        R,
        NK,
        diag,
        q_pos,
        kps,
        S,
        scaling * 1.4426950408889634,
    )
    consts = dict(
        HEAD_DIM=D,
        D_PAD=d_pad,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        MASK_MODE=0 if dense is None else 1,
        HAS_KV_START=kv_start is not None,
        POS_ON_DEVICE=pos is not None,
        HAS_BIAS=bias is not None,
        HAS_GROUPS=key_group is not None,
        HG_PER_HEAD=key_group is not None and key_group.shape[1] > 1,
        G=G,
        NG=NG,
        IEEE=q.dtype == torch.float32,
        EMU=emulate_bf16(q.dtype),
        FINISH=finish,
        **finish_consts,
    )
    _LAUNCH_DECODE((S, B * Hkv), args, consts, 4, num_stages)
    if finish:
        return out, masses
    args = (
        po,
        pl,
        pm,
        out,
        masses_arg,
        mv_i,
        mv_f,
        keep,
        row_start,
        scale_arg,
        shift_arg,
        pos_arg,
        out_st[0],
        out_st[2],
        B,
        H,
        Hkv,
        R,
        S,
        q_pos,
    )
    consts = dict(
        HEAD_DIM=D,
        D_PAD=d_pad,
        BLOCK_R=block_r,
        NG=NG,
        G=G,
        POS_ON_DEVICE=pos is not None,
        **finish_consts,
    )
    _LAUNCH_COMBINE((B * Hkv,), args, consts, 4)
    return out, masses
