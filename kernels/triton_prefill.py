"""Fused prefill attention that executes a layer's parameter tables without the N x N map.

One program handles BLOCK_M query rows of one query head (grouped-query
attention reads the shared K/V head; nothing is repeated). Keys of the
*member* groups (group id != 0: first token, sinks, image, span) are few, so
every edit is a correction on the few key tiles that hold members (a sorted
member-tile list per batch row and key-group head). The rows' result before
the corrections comes from one of two *bulks*:

- fused (exact): this kernel's own FlashAttention-2 main loop over the
  visible key tiles, split into masked and unmasked phases, with member keys
  excluded. The member passes then add the members' biased exp-weights per
  group to the same running max (group masses W_g: sums of positive terms,
  nothing cancels); the moves turn masses into coefficients c_g; pass 2 adds
  sum_j c_g(j) p_j v_j / L to c_0 acc / L. Without moves one pass continues
  the flash recurrence with biased logits.
- ``BULK``: a flash kernel's output O and log-sum-exp over *all* keys
  (cuDNN through torch). With a_j = exp(s_j - lse) the member masses are
  U_g = sum_{j in g} a_j, U_0 = 1 - sum U_g, W_g = e^{b_g} U_g, L = sum W_g,
  and o = (c_0 O + sum_{g>0} (c_g e^{b_g} - c_0) sum_{j in g} a_j v_j) / L.
  The bulk's own rounding is multiplied by c_0 / L; rows where that exceeds
  ``ALPHA_MAX`` are flagged, and a second launch of the fused kernel
  (``ONLY_FLAGGED``) recomputes exactly the row blocks that hold them.

The epilogue writes o, the output scale and shift, and optionally the row's
log2-sum-exp (for column scores) and the group masses before moves.
Masks: MASK_MODE 0 is causal with key j visible from row i iff
``kv_start[b] <= j <= i + DIAG``; MASK_MODE 1 reads a dense (B, 1, Q, K) mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    LOG2E,
    LOG2E_F,
    Launcher,
    add_group_sums,
    cdiv,
    dot_pv,
    dot_qk,
    emulate_bf16,
    finish_rows,
    key_bias,
    key_coef,
    move_coefficients,
    next_pow2,
    placeholders,
)

# Tile shapes per padded head_dim and element size: (BLOCK_M, BLOCK_N, num_warps, num_stages).
# Chosen by benchmarks/bench_attention.py --sweep on an H100 (see benchmarks/results/NOTES.md).
CONFIGS = {
    (64, 2): (128, 64, 4, 3),
    (128, 2): (128, 64, 8, 3),
    (256, 2): (64, 32, 4, 2),
    (64, 4): (64, 32, 4, 2),
    (128, 4): (64, 32, 4, 2),
    (256, 4): (32, 32, 4, 1),
}
# The bulk epilogue's (BLOCK_M, num_warps, num_stages) per padded head_dim and element size (its BLOCK_N
# is the member list's, from CONFIGS): it has no main loop, only the member-tile passes.
BULK_TILES = {
    (64, 2): (64, 4, 3),
    (128, 2): (64, 4, 3),
    (256, 2): (64, 4, 1),
}
SENTINEL = 1 << 20  # tile index past every key: ends a member-tile list
ALPHA_MAX = 2.0  # bulk rows whose rounding an edit would amplify more than this are recomputed exactly


def pick_config(d_pad: int, elem: int) -> tuple[int, int, int, int]:
    """Tile shapes for a padded head_dim and element size in bytes."""
    d = 64 if d_pad <= 64 else d_pad
    return CONFIGS[(d, 2 if elem <= 2 else 4)]


@triton.jit
def _visible(rows, cols, ks, NK, DIAG, DM_ROW0, stride_dq, NQ, MASK_MODE: tl.constexpr):
    """(ROWS, N) bool: which keys each row may see."""
    ok = (cols < NK)[None, :]
    if MASK_MODE == 0:
        ok = ok & (cols >= ks)[None, :] & (cols[None, :] <= rows[:, None] + DIAG)
    else:
        # rows past the last query (a block's tail) read nothing: the mask has only NQ rows
        dm = tl.load(
            DM_ROW0 + rows[:, None].to(tl.int64) * stride_dq + cols[None, :], mask=ok & (rows < NQ)[:, None], other=0
        )
        ok = ok & (dm != 0)
    return ok


@triton.jit
def _main(
    acc,
    l_i,
    m_i,
    mi,
    nm,
    q,
    K_BASE,
    V_BASE,
    KG_ROW,
    ML_ROW,
    DM_ROW0,
    lo,
    hi,
    offs_m,
    offs_n,
    offs_d,
    ks,
    NK,
    DIAG,
    qk_scale,
    stride_kn,
    stride_vn,
    stride_dq,
    NQ,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    MASK_MODE: tl.constexpr,
    MEMBERS: tl.constexpr,
    LSE_ONLY: tl.constexpr,
    IEEE: tl.constexpr,
    EMU: tl.constexpr,
):
    """Flash recurrence over key tiles [lo, hi) (multiples of BLOCK_N); member keys excluded."""
    dmask = (offs_d < HEAD_DIM)[None, :]
    for n in range(lo, hi, BLOCK_N):
        n = tl.multiple_of(n, BLOCK_N)
        cols = n + offs_n
        if MASKED:
            k = tl.load(
                K_BASE + cols[:, None] * stride_kn + offs_d[None, :], mask=(cols < NK)[:, None] & dmask, other=0.0
            )
        elif HEAD_DIM == D_PAD:
            k = tl.load(K_BASE + cols[:, None] * stride_kn + offs_d[None, :])
        else:
            k = tl.load(K_BASE + cols[:, None] * stride_kn + offs_d[None, :], mask=dmask, other=0.0)
        qk = dot_qk(q, tl.trans(k), IEEE, EMU)
        if MASKED:
            qk = tl.where(_visible(offs_m, cols, ks, NK, DIAG, DM_ROW0, stride_dq, NQ, MASK_MODE), qk, float("-inf"))
        if MEMBERS:
            if nm == n:  # this tile holds members: they are added by the member passes
                kg = tl.load(KG_ROW + cols, mask=cols < NK, other=0)
                qk = tl.where((kg != 0)[None, :], float("-inf"), qk)
                mi += 1
                nm = tl.load(ML_ROW + mi) * BLOCK_N
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if not LSE_ONLY:
            if MASKED:
                v = tl.load(
                    V_BASE + cols[:, None] * stride_vn + offs_d[None, :], mask=(cols < NK)[:, None] & dmask, other=0.0
                )
            elif HEAD_DIM == D_PAD:
                v = tl.load(V_BASE + cols[:, None] * stride_vn + offs_d[None, :])
            else:
                v = tl.load(V_BASE + cols[:, None] * stride_vn + offs_d[None, :], mask=dmask, other=0.0)
            acc = acc * alpha[:, None]
            acc = dot_pv(p, v, acc, IEEE, EMU)
        m_i = m_new
    return acc, l_i, m_i, mi, nm


@triton.jit
def _member_logits(
    q,
    K_BASE,
    KG_ROW,
    DM_ROW0,
    n,
    offs_m,
    offs_n,
    offs_d,
    ks,
    NK,
    DIAG,
    qk_scale,
    stride_kn,
    stride_dq,
    NQ,
    HEAD_DIM: tl.constexpr,
    MASK_MODE: tl.constexpr,
    IEEE: tl.constexpr,
    EMU: tl.constexpr,
):
    """Unbiased log2-domain logits (ROWS, N) of the visible member keys of tile n (-inf elsewhere); its key groups."""
    cols = n + offs_n
    k = tl.load(
        K_BASE + cols[:, None] * stride_kn + offs_d[None, :],
        mask=(cols < NK)[:, None] & (offs_d < HEAD_DIM)[None, :],
        other=0.0,
    )
    kg = tl.load(KG_ROW + cols, mask=cols < NK, other=0).to(tl.int32)
    own = _visible(offs_m, cols, ks, NK, DIAG, DM_ROW0, stride_dq, NQ, MASK_MODE) & (kg != 0)[None, :]
    return tl.where(own, dot_qk(q, tl.trans(k), IEEE, EMU) * qk_scale, float("-inf")), kg


@triton.jit
def _load_v(V_BASE, n, offs_n, offs_d, NK, stride_vn, HEAD_DIM: tl.constexpr):
    cols = n + offs_n
    return tl.load(
        V_BASE + cols[:, None] * stride_vn + offs_d[None, :],
        mask=(cols < NK)[:, None] & (offs_d < HEAD_DIM)[None, :],
        other=0.0,
    )


@triton.jit
def _group_exp_bias(BIAS_ROW, G: tl.constexpr, GP: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(GP,) e^{b_g} of the head's (shifted) group biases; 1 without bias."""
    g = tl.arange(0, GP)
    if HAS_BIAS:
        return tl.math.exp2(tl.load(BIAS_ROW + g, mask=g < G, other=0.0))
    return tl.zeros([GP], tl.float32) + 1.0


@triton.jit
def _fused_members(
    acc,
    l_i,
    m_i,
    q,
    K_BASE,
    V_BASE,
    KG_ROW,
    ML_ROW,
    DM_ROW0,
    BIAS_ROW,
    cnt,
    lo,
    hi,
    b,
    h,
    offs_m,
    offs_n,
    offs_d,
    ks,
    NK,
    DIAG,
    Q_POS0,
    qk_scale,
    stride_kn,
    stride_vn,
    stride_dq,
    NQ,
    MV_I,
    MV_F,
    KEEP,
    ROW_START,
    H,
    B,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    NM: tl.constexpr,
    TWO_PASS: tl.constexpr,
    LSE_ONLY: tl.constexpr,
    IEEE: tl.constexpr,
    EMU: tl.constexpr,
):
    """Exact member passes after the fused main loop (which left the member keys out).

    Returns (acc, norm, L, m_i, mass): the epilogue's output is acc / norm; L is the row's
    total exp-weight relative to m_i (for the log-sum-exp); mass (ROWS, GP) the group masses.
    """
    cols_g = tl.arange(0, GP)
    T = tl.zeros([acc.shape[0], GP], tl.float32)  # member exp-weights per group, same reference max as l_i
    for t in range(0, cnt):
        n = tl.load(ML_ROW + t) * BLOCK_N
        if (n < hi) & (n + BLOCK_N > lo):
            s, kg = _member_logits(
                q,
                K_BASE,
                KG_ROW,
                DM_ROW0,
                n,
                offs_m,
                offs_n,
                offs_d,
                ks,
                NK,
                DIAG,
                qk_scale,
                stride_kn,
                stride_dq,
                NQ,
                HEAD_DIM,
                MASK_MODE,
                IEEE,
                EMU,
            )
            if HAS_BIAS:
                s = s + key_bias(BIAS_ROW, kg, G)[None, :]
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_use)
            p = tl.math.exp2(s - m_use[:, None])
            l_i = l_i * alpha
            T = add_group_sums(T * alpha[:, None], p, kg, G, GP)
            if not LSE_ONLY:
                acc = acc * alpha[:, None]
                if not TWO_PASS:  # no moves: the members' output with their biased weights, now
                    acc = dot_pv(p, _load_v(V_BASE, n, offs_n, offs_d, NK, stride_vn, HEAD_DIM), acc, IEEE, EMU)
            m_i = m_new
    W = T + tl.where((cols_g == 0)[None, :], l_i[:, None], 0.0)
    L = tl.sum(W, 1)
    inv = tl.where(L > 0, 1.0 / tl.where(L > 0, L, 1.0), 0.0)
    mass = W * inv[:, None]
    norm = L
    if TWO_PASS and not LSE_ONLY:
        c = move_coefficients(
            mass, h + tl.zeros_like(offs_m), Q_POS0 + offs_m.to(tl.int64), b, MV_I, MV_F, KEEP, ROW_START, H, B, NM, GP
        )
        c = c * inv[:, None]  # c_g / L: products with p are final weights <= 1 (no fp16 overflow)
        acc = acc * tl.sum(tl.where((cols_g == 0)[None, :], c, 0.0), 1)[:, None]
        m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
        for t in range(0, cnt):
            n = tl.load(ML_ROW + t) * BLOCK_N
            if (n < hi) & (n + BLOCK_N > lo):
                s, kg = _member_logits(
                    q,
                    K_BASE,
                    KG_ROW,
                    DM_ROW0,
                    n,
                    offs_m,
                    offs_n,
                    offs_d,
                    ks,
                    NK,
                    DIAG,
                    qk_scale,
                    stride_kn,
                    stride_dq,
                    NQ,
                    HEAD_DIM,
                    MASK_MODE,
                    IEEE,
                    EMU,
                )
                if HAS_BIAS:
                    s = s + key_bias(BIAS_ROW, kg, G)[None, :]
                w = tl.math.exp2(s - m_use[:, None]) * key_coef(c, kg, G, GP)
                acc = dot_pv(w, _load_v(V_BASE, n, offs_n, offs_d, NK, stride_vn, HEAD_DIM), acc, IEEE, EMU)
        norm = tl.where(L > 0, 1.0, 0.0)
    return acc, norm, L, m_i, mass


@triton.jit
def _tile_range(ML_ROW, cnt, lo, hi, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr = 32):
    """(first, end) positions in a sorted member-tile list of the tiles that meet keys [lo, hi)."""
    offs = tl.arange(0, CHUNK)
    first = cnt * 0
    end = cnt * 0
    for c in range(0, cnt, CHUNK):
        listed = c + offs < cnt
        n = tl.load(ML_ROW + c + offs, mask=listed, other=0) * BLOCK_N
        first += tl.sum((listed & (n + BLOCK_N <= lo)).to(tl.int32), 0)
        end += tl.sum((listed & (n < hi)).to(tl.int32), 0)
    return first, end


@triton.jit
def _bulk_logits(
    q,
    K_BASE,
    KG_ROW,
    DM_ROW0,
    n,
    row0,
    offs_m,
    offs_n,
    offs_d,
    ks,
    NK,
    DIAG,
    qk_scale,
    stride_kn,
    stride_dq,
    NQ,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_MODE: tl.constexpr,
    IEEE: tl.constexpr,
    EMU: tl.constexpr,
):
    """Log2-domain logits (ROWS, N) of tile n for the bulk epilogue, and its key groups.

    Only invisible keys are masked (group-0 keys are left as they are: the epilogue weighs them by 0),
    and a tile every row sees whole is not masked at all.
    """
    cols = n + offs_n
    k = tl.load(
        K_BASE + cols[:, None] * stride_kn + offs_d[None, :],
        mask=(cols < NK)[:, None] & (offs_d < HEAD_DIM)[None, :],
        other=0.0,
    )
    kg = tl.load(KG_ROW + cols, mask=cols < NK, other=0).to(tl.int32)
    s = dot_qk(q, tl.trans(k), IEEE, EMU) * qk_scale
    whole = (MASK_MODE == 0) & (n >= ks) & (n + BLOCK_N <= tl.minimum(NK, row0 + DIAG + 1))
    if not whole:
        s = tl.where(_visible(offs_m, cols, ks, NK, DIAG, DM_ROW0, stride_dq, NQ, MASK_MODE), s, float("-inf"))
    return s, kg


@triton.jit
def _bulk_members(
    m2,
    q,
    K_BASE,
    V_BASE,
    KG_ROW,
    ML_ROW,
    DM_ROW0,
    BIAS_ROW,
    cnt,
    lo,
    hi,
    b,
    h,
    offs_m,
    offs_n,
    offs_d,
    ks,
    NK,
    DIAG,
    Q_POS0,
    qk_scale,
    stride_kn,
    stride_vn,
    stride_dq,
    NQ,
    MV_I,
    MV_F,
    KEEP,
    ROW_START,
    H,
    B,
    ALPHA_MAX,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    NM: tl.constexpr,
    IEEE: tl.constexpr,
    EMU: tl.constexpr,
):
    """Member corrections of a flash bulk over all keys, whose log2-sum-exp per row is m2.

    Returns (corr, fac, edited, L, mass, flagged): the corrected rows are `O * fac + corr` with O the
    bulk's (normalised) output, so the caller reads O only where a row changes; `edited` says whether
    any row of the block has a nonzero member coefficient (corr is zero otherwise); flagged rows are
    those whose bulk rounding the edit amplifies by more than ALPHA_MAX (fac = c_0 / L).
    """
    cols_g = tl.arange(0, GP)
    m_col = tl.where(m2 == float("-inf"), 0.0, m2)[:, None]  # one broadcast, shared by both loops
    U = tl.zeros([offs_m.shape[0], GP], tl.float32)  # unbiased member masses a_j summed per group (g > 0)
    t_lo, t_hi = _tile_range(ML_ROW, cnt, lo, hi, BLOCK_N)
    row0 = offs_m.to(tl.int32).min(0)  # tiles that end before row0 + DIAG + 1 are seen whole by every row
    for t in range(t_lo, t_hi):
        n = tl.load(ML_ROW + t) * BLOCK_N
        s, kg = _bulk_logits(
            q,
            K_BASE,
            KG_ROW,
            DM_ROW0,
            n,
            row0,
            offs_m,
            offs_n,
            offs_d,
            ks,
            NK,
            DIAG,
            qk_scale,
            stride_kn,
            stride_dq,
            NQ,
            HEAD_DIM,
            BLOCK_N,
            MASK_MODE,
            IEEE,
            EMU,
        )
        p = tl.math.exp2(s - m_col)
        for g in tl.static_range(1, G):  # group 0 is 1 - the rest; a group absent from the tile costs nothing
            if tl.max((kg == g).to(tl.int32), 0) > 0:
                sg = tl.sum(tl.where((kg == g)[None, :], p, 0.0), 1)
                U = tl.where((cols_g == g)[None, :], U + sg[:, None], U)
    eb = _group_exp_bias(BIAS_ROW, G, GP, HAS_BIAS)
    u0 = tl.maximum(1.0 - tl.sum(U, 1), 0.0)
    W = U * eb[None, :] + tl.where((cols_g == 0)[None, :], u0[:, None], 0.0)
    L = tl.where(m2 == float("-inf"), 0.0, tl.sum(W, 1))
    inv = tl.where(L > 0, 1.0 / tl.where(L > 0, L, 1.0), 0.0)
    mass = W * inv[:, None]
    c = move_coefficients(
        mass, h + tl.zeros_like(offs_m), Q_POS0 + offs_m.to(tl.int64), b, MV_I, MV_F, KEEP, ROW_START, H, B, NM, GP
    )
    c0 = tl.sum(tl.where((cols_g == 0)[None, :], c, 0.0), 1)
    coef = tl.where((cols_g == 0)[None, :], 0.0, (c * eb[None, :] - c0[:, None]) * inv[:, None])
    fac = c0 * inv
    corr = tl.zeros([offs_m.shape[0], offs_d.shape[0]], tl.float32)
    edited = tl.max(tl.max(tl.abs(coef), 1), 0) > 0
    if edited:  # some row of this block is edited
        for t in range(t_lo, t_hi):
            n = tl.load(ML_ROW + t) * BLOCK_N
            s, kg = _bulk_logits(
                q,
                K_BASE,
                KG_ROW,
                DM_ROW0,
                n,
                row0,
                offs_m,
                offs_n,
                offs_d,
                ks,
                NK,
                DIAG,
                qk_scale,
                stride_kn,
                stride_dq,
                NQ,
                HEAD_DIM,
                BLOCK_N,
                MASK_MODE,
                IEEE,
                EMU,
            )
            w = tl.math.exp2(s - m_col) * key_coef(coef, kg, G, GP, 1)
            corr = dot_pv(w, _load_v(V_BASE, n, offs_n, offs_d, NK, stride_vn, HEAD_DIM), corr, IEEE, EMU)
    return corr, fac, edited, L, mass, fac > ALPHA_MAX


@triton.jit
def _prefill_kernel(
    Q,
    K,
    V,
    OUT,
    LSE,
    MASSES,
    FLAGS,
    KG,
    BIAS,
    MLIST,
    MCOUNT,
    KV_START,
    DM,
    BULK_O,
    BULK_LSE,
    MV_I,
    MV_F,
    KEEP,
    ROW_START,
    SCALE,
    SHIFT,
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
    stride_db,
    stride_dq,
    stride_bb,
    stride_bh,
    stride_bm,
    stride_lb,
    stride_lh,
    B,
    H,
    R,
    NQ,
    NK,
    DIAG,
    Q_POS0,
    N_MLIST,
    qk_scale,
    ALPHA_MAX,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASK_MODE: tl.constexpr,
    HAS_KV_START: tl.constexpr,
    BULK: tl.constexpr,
    IN_PLACE: tl.constexpr,
    MEMBERS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HG_PER_HEAD: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    NM: tl.constexpr,
    TWO_PASS: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    LSE_ONLY: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    WRITE_MASSES: tl.constexpr,
    ONLY_FLAGGED: tl.constexpr,
    IEEE: tl.constexpr,
    EMU: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest (causal) rows first
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = offs_m < NQ
    if ONLY_FLAGGED:  # the exact recomputation of row blocks a bulk epilogue flagged
        if tl.max(tl.load(FLAGS + bh.to(tl.int64) * NQ + offs_m, mask=rmask, other=0).to(tl.int32), 0) == 0:
            return
    kvh = h // R
    hg = h if HG_PER_HEAD else 0
    n_hg = H if HG_PER_HEAD else 1
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    dmask = offs_d < HEAD_DIM
    q = tl.load(
        Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
        mask=rmask[:, None] & dmask[None, :],
        other=0.0,
    )
    K_BASE = K + b.to(tl.int64) * stride_kb + kvh * stride_kh
    V_BASE = V + b.to(tl.int64) * stride_vb + kvh * stride_vh
    KG_ROW = KG + b.to(tl.int64) * stride_gb + hg * stride_gh
    ML_ROW = MLIST + (b * n_hg + hg) * N_MLIST
    DM_ROW0 = DM + b.to(tl.int64) * stride_db
    BIAS_ROW = BIAS + h * G
    ks = tl.load(KV_START + b) if HAS_KV_START else b * 0
    if MASK_MODE == 0:
        lo = ks
        hi = tl.minimum(NK, pid_m * BLOCK_M + BLOCK_M + DIAG)
    else:
        lo = b * 0
        hi = NK + b * 0
    hi_al = tl.cdiv(hi, BLOCK_N) * BLOCK_N
    mass = tl.zeros([BLOCK_M, GP], tl.float32)

    if BULK:  # a flash kernel's output and log-sum-exp over all keys
        lse_b = tl.load(BULK_LSE + b.to(tl.int64) * stride_lb + h * stride_lh + offs_m, mask=rmask, other=float("-inf"))
        m_i = lse_b * LOG2E
        corr, fac, edited, L, mass, flagged = _bulk_members(
            m_i,
            q,
            K_BASE,
            V_BASE,
            KG_ROW,
            ML_ROW,
            DM_ROW0,
            BIAS_ROW,
            tl.load(MCOUNT + b * n_hg + hg),
            lo,
            hi,
            b,
            h,
            offs_m,
            offs_n,
            offs_d,
            ks,
            NK,
            DIAG,
            Q_POS0,
            qk_scale,
            stride_kn,
            stride_vn,
            stride_dq,
            NQ,
            MV_I,
            MV_F,
            KEEP,
            ROW_START,
            H,
            B,
            ALPHA_MAX,
            HEAD_DIM,
            BLOCK_N,
            MASK_MODE,
            HAS_BIAS,
            G,
            GP,
            NM,
            IEEE,
            EMU,
        )
        tl.store(FLAGS + bh.to(tl.int64) * NQ + offs_m, flagged.to(tl.int8), mask=rmask)
        norm = tl.where(L > 0, 1.0, 0.0)
        if (not IN_PLACE) or (SCALE_MODE != 0) or HAS_SHIFT:
            write = tl.max(offs_m, 0) >= 0  # every block writes its rows
        else:
            # in place, a block whose rows all keep the bulk (factor 1 to far below half precision's
            # resolution, nothing added, no output scale or shift) is neither read nor written
            same = tl.where(rmask, ((tl.abs(fac - 1.0) < 1e-6) & (L > 0)).to(tl.int32), 1)
            write = edited | (tl.min(same, 0) == 0)
        if write:
            _bulk_rows(
                OUT,
                BULK_O + b.to(tl.int64) * stride_bb + h * stride_bh,
                fac,
                corr,
                norm,
                b,
                h,
                offs_m,
                offs_d,
                rmask,
                dmask,
                SCALE,
                SHIFT,
                H,
                stride_bm,
                stride_ob,
                stride_om,
                stride_oh,
                HEAD_DIM,
                SCALE_MODE,
                HAS_SHIFT,
            )
    else:
        m_i = tl.zeros([BLOCK_M], tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        lo_al = (lo // BLOCK_N) * BLOCK_N
        mi = b * 0
        nm = lo_al
        if MEMBERS:
            nm = tl.load(ML_ROW) * BLOCK_N
            while nm < lo_al:  # members left of the visible range (padding) are never hit
                mi += 1
                nm = tl.load(ML_ROW + mi) * BLOCK_N
        if MASK_MODE == 0:
            full_lo = tl.cdiv(lo, BLOCK_N) * BLOCK_N
            edge = tl.maximum(pid_m * BLOCK_M + DIAG + 1, 0)  # keys < edge are visible from every row
            full_hi = tl.maximum(full_lo, tl.minimum((edge // BLOCK_N) * BLOCK_N, (NK // BLOCK_N) * BLOCK_N))
            acc, l_i, m_i, mi, nm = _main(
                acc,
                l_i,
                m_i,
                mi,
                nm,
                q,
                K_BASE,
                V_BASE,
                KG_ROW,
                ML_ROW,
                DM_ROW0,
                lo_al,
                tl.minimum(full_lo, hi_al),
                offs_m,
                offs_n,
                offs_d,
                ks,
                NK,
                DIAG,
                qk_scale,
                stride_kn,
                stride_vn,
                stride_dq,
                NQ,
                HEAD_DIM,
                D_PAD,
                BLOCK_N,
                True,
                MASK_MODE,
                MEMBERS,
                LSE_ONLY,
                IEEE,
                EMU,
            )
            acc, l_i, m_i, mi, nm = _main(
                acc,
                l_i,
                m_i,
                mi,
                nm,
                q,
                K_BASE,
                V_BASE,
                KG_ROW,
                ML_ROW,
                DM_ROW0,
                full_lo,
                full_hi,
                offs_m,
                offs_n,
                offs_d,
                ks,
                NK,
                DIAG,
                qk_scale,
                stride_kn,
                stride_vn,
                stride_dq,
                NQ,
                HEAD_DIM,
                D_PAD,
                BLOCK_N,
                False,
                MASK_MODE,
                MEMBERS,
                LSE_ONLY,
                IEEE,
                EMU,
            )
            acc, l_i, m_i, mi, nm = _main(
                acc,
                l_i,
                m_i,
                mi,
                nm,
                q,
                K_BASE,
                V_BASE,
                KG_ROW,
                ML_ROW,
                DM_ROW0,
                tl.maximum(full_hi, full_lo),
                hi_al,
                offs_m,
                offs_n,
                offs_d,
                ks,
                NK,
                DIAG,
                qk_scale,
                stride_kn,
                stride_vn,
                stride_dq,
                NQ,
                HEAD_DIM,
                D_PAD,
                BLOCK_N,
                True,
                MASK_MODE,
                MEMBERS,
                LSE_ONLY,
                IEEE,
                EMU,
            )
        else:
            acc, l_i, m_i, mi, nm = _main(
                acc,
                l_i,
                m_i,
                mi,
                nm,
                q,
                K_BASE,
                V_BASE,
                KG_ROW,
                ML_ROW,
                DM_ROW0,
                lo,
                hi_al,
                offs_m,
                offs_n,
                offs_d,
                ks,
                NK,
                DIAG,
                qk_scale,
                stride_kn,
                stride_vn,
                stride_dq,
                NQ,
                HEAD_DIM,
                D_PAD,
                BLOCK_N,
                True,
                MASK_MODE,
                MEMBERS,
                LSE_ONLY,
                IEEE,
                EMU,
            )
        if MEMBERS:
            acc, norm, L, m_i, mass = _fused_members(
                acc,
                l_i,
                m_i,
                q,
                K_BASE,
                V_BASE,
                KG_ROW,
                ML_ROW,
                DM_ROW0,
                BIAS_ROW,
                tl.load(MCOUNT + b * n_hg + hg),
                lo,
                hi,
                b,
                h,
                offs_m,
                offs_n,
                offs_d,
                ks,
                NK,
                DIAG,
                Q_POS0,
                qk_scale,
                stride_kn,
                stride_vn,
                stride_dq,
                NQ,
                MV_I,
                MV_F,
                KEEP,
                ROW_START,
                H,
                B,
                HEAD_DIM,
                BLOCK_N,
                MASK_MODE,
                HAS_BIAS,
                G,
                GP,
                NM,
                TWO_PASS,
                LSE_ONLY,
                IEEE,
                EMU,
            )
        else:
            L = l_i
            norm = l_i
            mass = tl.where((tl.arange(0, GP) == 0)[None, :], tl.where(L > 0, 1.0, 0.0)[:, None], 0.0)

    if WRITE_LSE:
        tl.store(
            LSE + bh.to(tl.int64) * NQ + offs_m,
            tl.where(L > 0, m_i + tl.math.log2(tl.where(L > 0, L, 1.0)), float("-inf")),
            mask=rmask,
        )
    if WRITE_MASSES:
        cols_g = tl.arange(0, GP)
        tl.store(
            MASSES + (bh.to(tl.int64) * NQ + offs_m[:, None]) * G + cols_g[None, :],
            mass,
            mask=rmask[:, None] & (cols_g < G)[None, :],
        )
    if (not LSE_ONLY) and (not BULK):  # a bulk block stored its rows above, where they changed
        heads = h + tl.zeros([BLOCK_M], tl.int32)
        o = finish_rows(acc, norm, heads, b, offs_d, SCALE, SHIFT, H, HEAD_DIM, SCALE_MODE, HAS_SHIFT)
        _store_rows(OUT, o, b, h, offs_m, offs_d, rmask, dmask, stride_ob, stride_om, stride_oh)


@triton.jit
def _bulk_rows(
    OUT,
    BULK_O_ROW,
    fac,
    corr,
    norm,
    b,
    h,
    offs_m,
    offs_d,
    rmask,
    dmask,
    SCALE,
    SHIFT,
    H,
    stride_bm,
    stride_ob,
    stride_om,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
):
    """Corrected bulk rows: O * fac + corr (O the bulk's rows of head h), finished and stored."""
    acc = tl.load(
        BULK_O_ROW + offs_m[:, None].to(tl.int64) * stride_bm + offs_d[None, :],
        mask=rmask[:, None] & dmask[None, :],
        other=0.0,
    ).to(tl.float32)
    heads = h + tl.zeros_like(offs_m)
    o = finish_rows(acc * fac[:, None] + corr, norm, heads, b, offs_d, SCALE, SHIFT, H, HEAD_DIM, SCALE_MODE, HAS_SHIFT)
    _store_rows(OUT, o, b, h, offs_m, offs_d, rmask, dmask, stride_ob, stride_om, stride_oh)


@triton.jit
def _store_rows(OUT, o, b, h, offs_m, offs_d, rmask, dmask, stride_ob, stride_om, stride_oh):
    """Write rows `offs_m` of head h of the output (B, Q, H, D)."""
    tl.store(
        OUT + b.to(tl.int64) * stride_ob + offs_m[:, None].to(tl.int64) * stride_om + h * stride_oh + offs_d[None, :],
        o.to(OUT.dtype.element_ty),
        mask=rmask[:, None] & dmask[None, :],
    )


def prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scaling: float,
    diag: int,
    q_pos0: int,
    kv_start: torch.Tensor | None = None,
    dense: torch.Tensor | None = None,
    key_group: torch.Tensor | None = None,
    n_groups: int = 1,
    bias: torch.Tensor | None = None,
    members: tuple[torch.Tensor, torch.Tensor] | None = None,
    moves: tuple | None = None,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    bulk: tuple[torch.Tensor, torch.Tensor] | None = None,
    only_flagged: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    lse_only: bool = False,
    write_lse: bool = False,
    write_masses: bool = False,
    config: tuple[int, int, int, int] | None = None,
):
    """Launch the prefill kernel on prepared tables (`kernels.triton_ops` prepares them).

    Args:
        q: (B, H, Q, D); k, v: (B, Hkv, K, D); last dims contiguous.
        scaling: logit scale.
        diag: key j is visible from row i iff j <= i + diag (causal mode).
        q_pos0: absolute position of row 0 (row starts of moves).
        kv_start: (B,) int32 first visible key (causal mode), or None.
        dense: (B, 1, Q, K) uint8 mask, last dim contiguous, or None (causal mode).
        key_group: (B, Hg, K) uint8 group ids, last dim contiguous, or None.
        n_groups: G.
        bias: (H, G) fp32 log2-domain logit bias with group 0 shifted to 0, or None.
        members: (list (B, Hg, N) int32 sorted member-tile indices at this config's BLOCK_N,
            padded with SENTINEL; count (B, Hg) int32), from `member_tiles`.
        moves: (mv_i (NM, 5) int32, mv_f (NM, 2) fp32, keep (NM, H) fp32, row_start (NM, B) int64) or None.
        scale: (H,) or (B, H) fp32 output scale, or None; shift: (H, D) fp32, or None.
        bulk: (out (B, H, Q, D), lse (B, H, Q) natural log) of a flash kernel over all keys, causal.
        only_flagged: (B, H, Q) int8 flags of a bulk launch: recompute those row blocks exactly into `out`.
        out: (B, Q, H, D) output to write into (default: a new tensor).
        lse_only: compute only the row log2-sum-exp (no V).
        write_lse, write_masses: also return (B, H, Q) log2-sum-exp / (B, H, Q, G) masses.
        config: (BLOCK_M, BLOCK_N, num_warps, num_stages) override (default: `pick_config`, and for a
            bulk epilogue `BULK_TILES` with the same BLOCK_N).
    Returns:
        (out (B, Q, H, D) or None, lse2 or None, masses or None, flags (B, H, Q) int8 or None).
    """
    B, H, NQ, D = q.shape
    Hkv, NK = k.shape[1], k.shape[2]
    d_pad = max(16, next_pow2(D))
    BM, BN, warps, stages = config or pick_config(d_pad, q.element_size())
    dev = q.device
    dummy, dummy_f, dummy_u8 = placeholders(dev)
    if out is None and not lse_only:
        out = torch.empty(B, NQ, H, D, dtype=q.dtype, device=dev)
    lse = torch.empty(B, H, NQ, dtype=torch.float32, device=dev) if (write_lse or lse_only) else None
    G = n_groups
    GP = max(2, next_pow2(G))
    masses = torch.empty(B, H, NQ, G, dtype=torch.float32, device=dev) if write_masses else None
    flags = torch.empty(B, H, NQ, dtype=torch.int8, device=dev) if bulk is not None else only_flagged
    kg = key_group if key_group is not None else dummy_u8.view(1, 1, 8)
    mlist, mcount = members if members is not None else (dummy, dummy)
    bo, bl = bulk if bulk is not None else (dummy_f.view(1, 1, 1, 8), dummy_f.view(1, 1, 8))
    mv_i, mv_f, keep, row_start = moves if moves else (dummy, dummy_f, dummy_f, dummy)
    nm = mv_i.shape[0] if moves else 0
    dm = dense if dense is not None else dummy_u8.view(1, 1, 1, 8)
    grid = (cdiv(NQ, BM), B * H)
    if bulk is not None and config is None:
        BM, warps, stages = BULK_TILES[(64 if d_pad <= 64 else d_pad, 2)]
        grid = (cdiv(NQ, BM), B * H)
    args = (
        q,
        k,
        v,
        out if out is not None else dummy_f,
        lse if lse is not None else dummy_f,
        masses if masses is not None else dummy_f,
        flags if flags is not None else dummy,
        kg,
        bias if bias is not None else dummy_f,
        mlist,
        mcount,
        kv_start if kv_start is not None else dummy,
        dm,
        bo,
        bl,
        mv_i,
        mv_f,
        keep,
        row_start,
        scale if scale is not None else dummy_f,
        shift if shift is not None else dummy_f,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        *(out.stride()[:3] if out is not None else (0, 0, 0)),
        kg.stride(0),
        kg.stride(1),
        dm.stride(0),
        dm.stride(2),
        bo.stride(0),
        bo.stride(1),
        bo.stride(2),
        bl.stride(0),
        bl.stride(1),
        B,
        H,
        H // Hkv,
        NQ,
        NK,
        diag,
        q_pos0,
        mlist.shape[-1] if members is not None else 1,
        scaling * LOG2E_F,
        ALPHA_MAX,
    )
    consts = dict(
        HEAD_DIM=D,
        D_PAD=d_pad,
        BLOCK_M=BM,
        BLOCK_N=BN,
        MASK_MODE=0 if dense is None else 1,
        HAS_KV_START=kv_start is not None,
        BULK=bulk is not None,
        IN_PLACE=bulk is not None and out is not None and _same_memory(out, bulk[0].transpose(1, 2)),
        MEMBERS=members is not None and bulk is None,
        HAS_BIAS=bias is not None,
        HG_PER_HEAD=key_group is not None and key_group.shape[1] > 1,
        G=G,
        GP=GP,
        NM=nm,
        TWO_PASS=nm > 0 or write_masses,
        SCALE_MODE=0 if scale is None else scale.dim(),
        HAS_SHIFT=shift is not None,
        LSE_ONLY=lse_only,
        WRITE_LSE=write_lse or lse_only,
        WRITE_MASSES=write_masses,
        ONLY_FLAGGED=only_flagged is not None,
        IEEE=q.dtype == torch.float32,
        EMU=emulate_bf16(q.dtype),
    )
    _LAUNCH(grid, args, consts, warps, stages)
    return out, lse, masses, flags if bulk is not None else None


_LAUNCH = Launcher(_prefill_kernel)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are the same elements of the same storage (an in-place bulk epilogue)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


@triton.jit
def _member_list_kernel(
    KG,
    LIST,
    COUNT,
    stride_gb,
    stride_gh,
    HG,
    NK,
    NT,
    N_LIST,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,
    SENTINEL: tl.constexpr,
):
    """One program per (batch row, key-group head): indices of the key tiles holding a flagged key, ascending."""
    row = tl.program_id(0)
    KG_ROW = KG + (row // HG).to(tl.int64) * stride_gb + (row % HG) * stride_gh
    LIST_ROW = LIST + row.to(tl.int64) * N_LIST
    tiles = tl.arange(0, CHUNK)
    offs = tl.arange(0, BLOCK_N)
    cnt = row * 0
    for t0 in range(0, NT, CHUNK):
        cols = (t0 + tiles)[:, None] * BLOCK_N + offs[None, :]  # (CHUNK, BLOCK_N) keys of CHUNK tiles
        has = tl.max(tl.load(KG_ROW + cols, mask=cols < NK, other=0).to(tl.int32), 1) > 0
        pos = cnt + tl.cumsum(has.to(tl.int32), 0) - 1
        tl.store(LIST_ROW + pos, t0 + tiles, mask=has)
        cnt += tl.sum(has.to(tl.int32), 0)
    for p0 in range(0, N_LIST, CHUNK):  # the rest of the list: the end marker
        pos = p0 + tiles
        tl.store(LIST_ROW + pos, SENTINEL + tiles * 0, mask=(pos >= cnt) & (pos < N_LIST))
    tl.store(COUNT + row, cnt)


_LAUNCH_LIST = Launcher(_member_list_kernel)


def member_tiles(key_group: torch.Tensor, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted indices of the key tiles (of `block_n` keys) that hold flagged keys, per (batch row, key-group head).

    Args:
        key_group: (B, Hg, K) uint8, last dim contiguous.
    Returns:
        (list (B, Hg, nT + 1) int32, padded with SENTINEL; count (B, Hg) int32), on the device, one launch.
    """
    B, Hg, K = key_group.shape
    nT = cdiv(K, block_n)
    lst = torch.empty(B, Hg, nT + 1, dtype=torch.int32, device=key_group.device)
    count = torch.empty(B, Hg, dtype=torch.int32, device=key_group.device)
    args = (key_group, lst, count, key_group.stride(0), key_group.stride(1), Hg, K, nT, nT + 1)
    _LAUNCH_LIST((B * Hg,), args, dict(BLOCK_N=block_n, CHUNK=64, SENTINEL=SENTINEL), 4)
    return lst, count
