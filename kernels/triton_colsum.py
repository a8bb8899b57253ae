"""Column sums of the attention map from the rows' log-sum-exp (ACT's sink scores), tile by tile.

One program owns BLOCK_N keys of one query head and walks down the query rows
that can see them, recomputing ``A_ij = exp2(s_ij + bias_j - lse2_i)`` block
by block (the structure of a flash backward pass), so the map is never
stored. It adds whole (BLOCK_M, BLOCK_N) tiles and reduces over rows once at
the end, and masks only the row blocks that straddle the diagonal or padding.
`lse2` comes from the prefill kernel (``lse_only``), in the same log2 domain
and with the same (shifted) biases.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import Launcher, cdiv, dot_qk, emulate_bf16, key_bias, next_pow2, placeholders

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head_dim and element size; fp16/bf16 entries from
# benchmarks/bench_attention.py --sweep-colsum on an H100 (0.70x of SDPA's time at 16k tokens, Llama shape).
CONFIGS = {
    (64, 2): (64, 64, 4, 3),
    (128, 2): (64, 128, 8, 3),
    (256, 2): (32, 64, 4, 2),
    (64, 4): (32, 64, 4, 2),
    (128, 4): (32, 64, 4, 2),
    (256, 4): (32, 32, 4, 1),
}


@triton.jit
def _colsum_rows(
    acc,
    q_base,
    LSE_ROW,
    kt,
    bk,
    cols,
    ks,
    i_lo,
    i_hi,
    NQ,
    NK,
    DIAG,
    qk_scale,
    DM_ROW0,
    stride_qm,
    stride_dq,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,
    MASK_MODE: tl.constexpr,
    IEEE: tl.constexpr,
    EMU: tl.constexpr,
):
    """acc (BLOCK_M, BLOCK_N) += A over row blocks [i_lo, i_hi); unmasked blocks are fully visible and in range."""
    offs_d = tl.arange(0, D_PAD)
    for i0 in range(i_lo, i_hi, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        if MASKED or HEAD_DIM != D_PAD:
            rin = rows < NQ
            q = tl.load(
                q_base + rows[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                mask=rin[:, None] & (offs_d < HEAD_DIM)[None, :],
                other=0.0,
            )
        else:
            q = tl.load(q_base + rows[:, None].to(tl.int64) * stride_qm + offs_d[None, :])
        if MASKED:
            lse = tl.load(LSE_ROW + rows, mask=rows < NQ, other=float("inf"))
        else:
            lse = tl.load(LSE_ROW + rows)
        p = tl.math.exp2(dot_qk(q, kt, IEEE, EMU) * qk_scale + bk[None, :] - lse[:, None])
        if MASKED:
            vis = (rows < NQ)[:, None] & (cols < NK)[None, :]
            if MASK_MODE == 0:
                vis = vis & (cols >= ks)[None, :] & (cols[None, :] <= rows[:, None] + DIAG)
            else:
                dm = tl.load(DM_ROW0 + rows[:, None].to(tl.int64) * stride_dq + cols[None, :], mask=vis, other=0)
                vis = vis & (dm != 0)
            p = tl.where(vis, p, 0.0)
        acc += p
    return acc


@triton.jit
def _colsum_kernel(
    Q,
    K,
    LSE,
    KG,
    BIAS,
    KV_START,
    DM,
    COLSUM,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_gb,
    stride_gh,
    stride_db,
    stride_dq,
    H,
    R,
    NQ,
    NK,
    DIAG,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_MODE: tl.constexpr,
    HAS_KV_START: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HG_PER_HEAD: tl.constexpr,
    G: tl.constexpr,
    IEEE: tl.constexpr,
    EMU: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hg = h if HG_PER_HEAD else 0
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    kin = cols < NK
    k = tl.load(
        K
        + b.to(tl.int64) * stride_kb
        + (h // R) * stride_kh
        + cols[:, None].to(tl.int64) * stride_kn
        + offs_d[None, :],
        mask=kin[:, None] & (offs_d < HEAD_DIM)[None, :],
        other=0.0,
    )
    kt = tl.trans(k)
    if HAS_BIAS:
        kg = tl.load(KG + b.to(tl.int64) * stride_gb + hg * stride_gh + cols, mask=kin, other=0)
        bk = key_bias(BIAS + h * G, kg, G)
    else:
        bk = tl.zeros([BLOCK_N], tl.float32)
    ks = tl.load(KV_START + b) if HAS_KV_START else b * 0
    q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh
    LSE_ROW = LSE + bh.to(tl.int64) * NQ
    DM_ROW0 = DM + b.to(tl.int64) * stride_db
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if MASK_MODE == 0:
        i_lo = (tl.maximum(n0 - DIAG, 0) // BLOCK_M) * BLOCK_M  # rows before see none of these keys
        # rows from i_full on see every key of the tile (when the tile is clear of padding and of the end)
        i_full = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - DIAG, 0), BLOCK_M) * BLOCK_M
        i_end = (NQ // BLOCK_M) * BLOCK_M
        if (n0 < ks) | (n0 + BLOCK_N > NK):
            i_full = i_end
        i_full = tl.maximum(tl.minimum(i_full, i_end), i_lo)
        acc = _colsum_rows(
            acc,
            q_base,
            LSE_ROW,
            kt,
            bk,
            cols,
            ks,
            i_lo,
            i_full,
            NQ,
            NK,
            DIAG,
            qk_scale,
            DM_ROW0,
            stride_qm,
            stride_dq,
            HEAD_DIM,
            D_PAD,
            BLOCK_M,
            True,
            MASK_MODE,
            IEEE,
            EMU,
        )
        acc = _colsum_rows(
            acc,
            q_base,
            LSE_ROW,
            kt,
            bk,
            cols,
            ks,
            i_full,
            tl.maximum(i_end, i_full),
            NQ,
            NK,
            DIAG,
            qk_scale,
            DM_ROW0,
            stride_qm,
            stride_dq,
            HEAD_DIM,
            D_PAD,
            BLOCK_M,
            False,
            MASK_MODE,
            IEEE,
            EMU,
        )
        acc = _colsum_rows(
            acc,
            q_base,
            LSE_ROW,
            kt,
            bk,
            cols,
            ks,
            tl.maximum(i_end, i_full),
            NQ,
            NQ,
            NK,
            DIAG,
            qk_scale,
            DM_ROW0,
            stride_qm,
            stride_dq,
            HEAD_DIM,
            D_PAD,
            BLOCK_M,
            True,
            MASK_MODE,
            IEEE,
            EMU,
        )
    else:
        acc = _colsum_rows(
            acc,
            q_base,
            LSE_ROW,
            kt,
            bk,
            cols,
            ks,
            b * 0,
            NQ,
            NQ,
            NK,
            DIAG,
            qk_scale,
            DM_ROW0,
            stride_qm,
            stride_dq,
            HEAD_DIM,
            D_PAD,
            BLOCK_M,
            True,
            MASK_MODE,
            IEEE,
            EMU,
        )
    tl.store(COLSUM + bh.to(tl.int64) * NK + cols, tl.sum(acc, 0), mask=kin)


_LAUNCH = Launcher(_colsum_kernel)


def colsum(
    q: torch.Tensor,
    k: torch.Tensor,
    lse2: torch.Tensor,
    *,
    scaling: float,
    diag: int,
    kv_start: torch.Tensor | None = None,
    dense: torch.Tensor | None = None,
    key_group: torch.Tensor | None = None,
    n_groups: int = 1,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Column sums (B, H, K) fp32 of the map whose rows have log2-sum-exp `lse2` (B, H, Q).

    Arguments as `triton_prefill.prefill`; `bias` must be the same log2-domain table that produced `lse2`.
    """
    B, H, NQ, D = q.shape
    Hkv, NK = k.shape[1], k.shape[2]
    dev = q.device
    d_pad = max(16, next_pow2(D))
    BM, BN, warps, stages = config or CONFIGS[(64 if d_pad <= 64 else d_pad, 2 if q.element_size() <= 2 else 4)]
    out = torch.empty(B, H, NK, dtype=torch.float32, device=dev)
    dummy, dummy_f, dummy_u8 = placeholders(dev)
    kg = key_group if key_group is not None else dummy_u8.view(1, 1, 8)
    dm = dense if dense is not None else dummy_u8.view(1, 1, 1, 8)
    has_bias = bias is not None and key_group is not None
    args = (
        q,
        k,
        lse2,
        kg,
        bias if has_bias else dummy_f,
        kv_start if kv_start is not None else dummy,
        dm,
        out,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        kg.stride(0),
        kg.stride(1),
        dm.stride(0),
        dm.stride(2),
        H,
        H // Hkv,
        NQ,
        NK,
        diag,
        scaling * 1.4426950408889634,
    )
    consts = dict(
        HEAD_DIM=D,
        D_PAD=d_pad,
        BLOCK_M=BM,
        BLOCK_N=BN,
        MASK_MODE=0 if dense is None else 1,
        HAS_KV_START=kv_start is not None,
        HAS_BIAS=has_bias,
        HG_PER_HEAD=key_group is not None and key_group.shape[1] > 1,
        G=n_groups,
        IEEE=q.dtype == torch.float32,
        EMU=emulate_bf16(q.dtype),
    )
    _LAUNCH((cdiv(NK, BN), B * H), args, consts, warps, stages)
    return out
