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

With one split (short caches: `n_splits` asks for at least 512 keys a split;
and, for steps launched from the host, caches under `ONE_SPLIT_HOST` keys) the
decode kernel finishes its rows itself (``FINISH``): one launch instead of two
and no partial-sum buffers. The merge of a single split multiplies by
exp2(0) = 1, so both ways give the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    Launcher,
    Template,
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
ONE_SPLIT_HOST = 4096  # keys below which a host-driven decoding step is one launch (see `Decoder`)


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


class Decoder:
    """The launches of decoding steps of one configuration, with everything fixed set up once.

    What a step's launch derives from sizes, dtypes and the layer's plan tensors (the constexprs,
    the placeholders standing for absent tensors, the bias, packed moves, the launch arguments
    that never change and their part of the launch key) is computed here, once; a call passes only
    what may change from one step to the next: q, k, v, key groups, the masks, the query position,
    the output scale and shift. Key splits are chosen per call (they depend on the key count), and
    each split mode gets its launch templates at its first use.

    Args (fixed for the decoder's life):
        q, k: a step's query (B, H, 1, D) and keys (B, Hkv, K, D): only their sizes, dtype and device are kept.
        scaling: logit scale.
        n_groups, per_group, bias, moves, write_masses, splits, block_n, num_stages: as `decode`.
        has_groups, groups_per_head: whether calls pass key groups, and whether those have one row per head.
        has_kv_start, dense, pos_on_device: which of `decode`'s kv_start, dense and pos calls pass.
        scale_dim: 0 without an output scale, else its number of dimensions (1: (H,), 2: (B, H)).
        has_shift: whether calls pass an output shift.
        row_starts: whether calls pass the moves' row starts (per input), `moves` holding placeholders there.
    """

    def __init__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        *,
        scaling: float,
        n_groups: int = 1,
        per_group: bool = False,
        bias: torch.Tensor | None = None,
        moves: tuple | None = None,
        has_groups: bool = False,
        groups_per_head: bool = False,
        has_kv_start: bool = False,
        dense: bool = False,
        pos_on_device: bool = False,
        scale_dim: int = 0,
        has_shift: bool = False,
        row_starts: bool = False,
        write_masses: bool = False,
        splits: int | None = None,
        block_n: int = BLOCK_N,
        num_stages: int = 3,
    ):
        B, H, _, D = q.shape
        self.row_starts = row_starts
        self.B, self.H, self.D, self.Hkv = B, H, D, k.shape[1]
        self.dtype, self.device = q.dtype, q.device
        self.R = H // self.Hkv
        self.d_pad = max(16, next_pow2(D))
        self.block_r = max(16, next_pow2(self.R))
        self.G = n_groups
        self.NG = max(2, next_pow2(n_groups)) if per_group else 1
        self.splits, self.block_n, self.num_stages = splits, block_n, num_stages
        self.qk_scale = scaling * 1.4426950408889634
        self.bias, self.moves = bias, moves
        self.has_groups, self.has_kv_start, self.dense, self.pos_on_device = (
            has_groups,
            has_kv_start,
            dense,
            pos_on_device,
        )
        self.scale_dim, self.has_shift, self.write_masses = scale_dim, has_shift, write_masses
        self.finish_consts = dict(
            NM=moves[0].shape[0] if moves else 0,
            SCALE_MODE=scale_dim,
            HAS_SHIFT=has_shift,
            WRITE_MASSES=write_masses,
        )
        self.consts = dict(
            HEAD_DIM=D,
            D_PAD=self.d_pad,
            BLOCK_R=self.block_r,
            BLOCK_N=block_n,
            MASK_MODE=1 if dense else 0,
            HAS_KV_START=has_kv_start,
            POS_ON_DEVICE=pos_on_device,
            HAS_BIAS=bias is not None,
            HAS_GROUPS=has_groups,
            HG_PER_HEAD=has_groups and groups_per_head,
            G=n_groups,
            NG=self.NG,
            IEEE=q.dtype == torch.float32,
            EMU=emulate_bf16(q.dtype),
            **self.finish_consts,
        )
        # n_splits gives 1 below 1024 keys anyway. A step whose query position the host knows (a dynamic
        # cache, launched from Python at every step) keeps one split, i.e. one launch and no partial-sum
        # buffers, up to ONE_SPLIT_HOST keys: there the host work of a second launch (the combine) and
        # three allocations costs more than the longer single program takes on the device. Under CUDA
        # graphs (the position on the device: a static cache) launches cost nothing and splits pay.
        self.one_split_below = 1024 if pos_on_device else ONE_SPLIT_HOST
        self._templates: dict[bool, tuple] = {}

    def _fixed(self, finish: bool) -> tuple:
        """(decode template, combine template or None) for one split mode: every argument a step does not change."""
        hit = self._templates.get(finish)
        if hit is not None:
            return hit
        dummy, dummy_f, dummy_u8 = placeholders(self.device)
        B, H, D = self.B, self.H, self.D
        out_st = (H * D, H * D, D, 1)  # the (B, 1, H, D) contiguous output each step allocates
        mv_i, mv_f, keep, row_start = self.moves if self.moves else (dummy, dummy_f, dummy_f, dummy)
        named = dict(
            Q=None, K=None, V=None,
            KG=dummy_u8, BIAS=self.bias if self.bias is not None else dummy_f, KV_START=dummy, DM=dummy_u8,
            POS=dummy, PO=dummy_f, PL=dummy_f, PM=dummy_f, OUT=None, MASSES=dummy_f,
            MV_I=mv_i, MV_F=mv_f, KEEP=keep, ROW_START=row_start, SCALE=dummy_f, SHIFT=dummy_f,
            stride_qb=0, stride_qh=0, stride_kb=0, stride_kh=0, stride_kn=0, stride_vb=0, stride_vh=0, stride_vn=0,
            stride_gb=8, stride_gh=8, stride_db=8, stride_ob=out_st[0], stride_oh=out_st[2],
            B=B, H=H, HKV=self.Hkv, R=self.R, NK=0, DIAG=0, Q_POS=0, KEYS_PER_SPLIT=0, S=1, qk_scale=self.qk_scale,
        )  # fmt: skip
        free = ["Q", "K", "V", "OUT", "stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_kn"]
        free += ["stride_vb", "stride_vh", "stride_vn", "NK", "DIAG", "Q_POS", "KEYS_PER_SPLIT"]
        free += ["KG", "stride_gb", "stride_gh"] if self.has_groups else []
        free += ["KV_START"] if self.has_kv_start else []
        free += ["DM", "stride_db"] if self.dense else []
        free += ["POS"] if self.pos_on_device else []
        free += [] if finish else ["PO", "PL", "PM", "S"]
        free += ["MASSES"] if self.write_masses else []
        free += ["SCALE"] if self.scale_dim else []
        free += ["SHIFT"] if self.has_shift else []
        free += ["ROW_START"] if self.row_starts else []
        dec = _template(_LAUNCH_DECODE, named, free, dict(self.consts, FINISH=finish), self.num_stages)
        comb = None
        if not finish:
            named = dict(
                PO=None, PL=None, PM=None, OUT=None, MASSES=dummy_f, MV_I=mv_i, MV_F=mv_f, KEEP=keep,
                ROW_START=row_start, SCALE=dummy_f, SHIFT=dummy_f, POS=dummy, stride_ob=out_st[0],
                stride_oh=out_st[2], B=B, H=H, HKV=self.Hkv, R=self.R, S=0, Q_POS=0,
            )  # fmt: skip
            free = ["PO", "PL", "PM", "OUT", "S", "Q_POS"]
            free += ["MASSES"] if self.write_masses else []
            free += ["SCALE"] if self.scale_dim else []
            free += ["SHIFT"] if self.has_shift else []
            free += ["POS"] if self.pos_on_device else []
            free += ["ROW_START"] if self.row_starts else []
            consts = dict(
                HEAD_DIM=D,
                D_PAD=self.d_pad,
                BLOCK_R=self.block_r,
                NG=self.NG,
                G=self.G,
                POS_ON_DEVICE=self.pos_on_device,
                **self.finish_consts,
            )
            comb = _template(_LAUNCH_COMBINE, named, free, consts, 1)
        hit = self._templates[finish] = (dec, comb)
        return hit

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        diag: int,
        q_pos: int,
        pos: torch.Tensor | None = None,
        kv_start: torch.Tensor | None = None,
        dense: torch.Tensor | None = None,
        key_group: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
        row_start: torch.Tensor | None = None,
    ):
        """Launch one step; the arguments mean what they mean for `decode`, `row_start` (NM, B) int64 the moves'
        row starts when the decoder was made with `row_starts`. Returns (out, masses)."""
        B, H, D, Hkv = self.B, self.H, self.D, self.Hkv
        NK = k.shape[2]
        dev = self.device
        block_n = self.block_n
        S = self.splits or (1 if NK < self.one_split_below else n_splits(NK, B * Hkv, sm_count(dev)))
        kps = cdiv(cdiv(NK, S), block_n) * block_n
        S = cdiv(NK, kps)
        finish = S == 1  # one launch: the decode kernel finishes its rows itself
        dec, comb = self._fixed(finish)
        out = torch.empty(B, 1, H, D, dtype=self.dtype, device=dev)
        masses = torch.empty(B, H, 1, self.G, dtype=torch.float32, device=dev) if self.write_masses else None
        q_st, k_st, v_st = q.stride(), k.stride(), v.stride()
        values = [q, k, v, out, q_st[0], q_st[1], k_st[0], k_st[1], k_st[2], v_st[0], v_st[1], v_st[2]]
        values += [NK, diag, q_pos, kps]
        if self.has_groups:
            kg_st = key_group.stride()
            values += [key_group, kg_st[0], kg_st[1]]
        if self.has_kv_start:
            values.append(kv_start)
        if self.dense:
            values += [dense, dense.stride(0)]
        if self.pos_on_device:
            values.append(pos)
        if not finish:
            NG, d_pad = self.NG, self.d_pad
            po = torch.empty(B, H, S, NG, d_pad, dtype=torch.float32, device=dev)
            pl = torch.empty(B, H, S, NG, dtype=torch.float32, device=dev)
            pm = torch.empty(B, H, S, dtype=torch.float32, device=dev)
            values += [po, pl, pm, S]
        tail = [masses] if self.write_masses else []
        tail += [scale] if self.scale_dim else []
        tail += [shift] if self.has_shift else []
        starts = [row_start] if self.row_starts else []
        dec((S, B * Hkv), tuple(values + tail + starts))
        if not finish:
            comb((B * Hkv,), (po, pl, pm, out, S, q_pos, *tail, *([pos] if self.pos_on_device else []), *starts))
        return out, masses


def _template(launcher: Launcher, named: dict, free: list[str], consts: dict, num_stages: int) -> Template:
    """A launch template of `launcher`'s kernel from its arguments by name, those named in `free` given per call."""
    names = launcher.fn.arg_names[: len(named)]
    assert tuple(named) == tuple(names), "arguments out of the kernel's order"
    order = {n: i for i, n in enumerate(names)}
    return Template(launcher, tuple(named.values()), tuple(order[n] for n in free), consts, 4, num_stages)


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
    """Launch decode + combine for one query row (a `Decoder` made for this call alone).

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
    dec = Decoder(
        q,
        k,
        scaling=scaling,
        n_groups=n_groups,
        per_group=per_group,
        bias=bias,
        moves=moves,
        has_groups=key_group is not None,
        groups_per_head=key_group is not None and key_group.shape[1] > 1,
        has_kv_start=kv_start is not None,
        dense=dense is not None,
        pos_on_device=pos is not None,
        scale_dim=0 if scale is None else scale.dim(),
        has_shift=shift is not None,
        write_masses=write_masses,
        splits=splits,
        block_n=block_n,
        num_stages=num_stages,
    )
    return dec(
        q, k, v, diag=diag, q_pos=q_pos, pos=pos, kv_start=kv_start, dense=dense, key_group=key_group, scale=scale,
        shift=shift,
    )  # fmt: skip
