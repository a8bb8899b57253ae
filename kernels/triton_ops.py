"""The Triton backend: `attention` and `column_scores` with the reference's exact semantics.

This module prepares a layer's `LayerTables` for the kernels (log2-domain
biases shifted so that group 0 has none, member-tile lists, packed moves) and
picks a path. None of them waits for the device (no host sync per call):

- **decode** (one query row): `triton_decode`, split over the keys;
- **flash + scale** (no key-group edit; causal, unpadded, fp16/bf16 on CUDA):
  torch's `scaled_dot_product_attention`, then only the heads whose output is
  scaled or shifted are rewritten in place (`triton_scale`);
- **flash bulk + corrections** (key-group edits; causal, unpadded, fp16/bf16
  on CUDA): torch's cuDNN attention with its log-sum-exp over all keys, then
  the prefill kernel's epilogue corrects the member keys (``bulk=``); rows
  where the edit would amplify the bulk's rounding more than 2x are flagged
  and recomputed exactly by the fused kernel (``only_flagged=``);
- **split at the image span** (the same, when the tables name one image span
  [s, e) and leave rows before e alone, VAR's case, with at least
  `SPLIT_MIN_ROWS` rows after it): cuDNN on rows [0, e), on rows [e, N) over
  keys [e, N) and over the span's keys, combined by `triton_split` with the
  keys before the span and the edit; flagged rows as above;
- **fused** (everything else: padding, dense masks, chunked prefill, fp32, or
  no cuDNN): `triton_prefill`, its main loop leaving the member keys out and
  its member-tile passes adding them back with their biases and moves.

`column_scores(..., value=v)` computes the flash bulk once for ACT's sink
scores and keeps it for the `attention` call on the same q, k, v that follows.

Cases the kernels do not cover run the PyTorch reference, deliberately and
logged once per reason (`FALLBACKS`): logit soft-capping, more than
`MAX_GROUPS` key groups, head_dim over 256, dtypes other than fp16/bf16/fp32,
a dense mask with one row set per head, a bias of -inf on group 0.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from attnedit.errors import AttneditError
from attnedit.tables import LayerTables, MaskInfo

from . import reference
from .device import capturing
from .triton_colsum import colsum as _colsum
from .triton_common import next_pow2, placeholders
from .triton_decode import Decoder as _Decoder
from .triton_decode import decode as _decode
from .triton_prefill import member_tiles, pick_config
from .triton_prefill import prefill as _prefill
from .triton_scale import scale_heads as _scale_heads
from .triton_split import combine as _combine

log = logging.getLogger("attnedit")

LOG2E = 1.4426950408889634
MAX_GROUPS = 16
MAX_HEAD_DIM = 256
FALLBACKS = {
    "softcap": "logit soft-capping (Gemma 2) is not in the kernels",
    "groups": f"more than {MAX_GROUPS} key groups",
    "head_dim": f"head_dim above {MAX_HEAD_DIM}",
    "dtype": "dtypes other than float16, bfloat16, float32",
    "mask": "a dense mask with one row set per head",
    "bias": "a bias of -inf on the group of unflagged keys",
}
_warned: set[str] = set()
_memo_cache: dict[tuple, tuple] = {}
_flash_ok: dict[tuple, bool] = {}
_stash: list = []  # at most one (key, (q, k, v), bulk) from column_scores(value=...)
# The split at an image span runs where at least this many rows follow the span: it saves device time
# (the bulk epilogue's passes over the span's keys) at the cost of more launches and host time, which
# is what a shorter prefill is bound by (benchmarks/results/NOTES.md, "Splitting at the image span").
SPLIT_MIN_ROWS = 4096


# --------------------------------------------------------------------------- public entry points


def prepare(device: torch.device) -> None:
    """Make the per-device tensors every launch shares (see `dispatch.prepare`)."""
    placeholders(device)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tables: LayerTables | None,
    mask: MaskInfo,
    *,
    scaling: float,
    softcap: float | None = None,
    return_masses: bool = False,
    path: str | None = None,
    config: tuple[int, int, int, int] | None = None,
    splits: int | None = None,
):
    """Attention with the layer's tables applied, as `reference.attention`.

    Args:
        q: (B, H, Q, D); k, v: (B, Hkv, K, D) (views are fine).
        tables: the layer's runtime tables, or None.
        mask: the mask in its backend forms.
        scaling: logit scale.
        softcap: logit soft-capping (runs the reference).
        return_masses: also return the (B, H, Q, G) group masses before moves.
        path: "fused" skips the flash-kernel paths (tests and benchmarks).
        config: prefill tile shapes (BLOCK_M, BLOCK_N, num_warps, num_stages) override.
        splits: decode key-split override.
    Returns:
        out (B, Q, H, D) in q's dtype [, masses].
    """
    if _fallback(q, k, tables, mask, softcap) is not None:
        return reference.attention(
            q,
            k,
            v,
            tables,
            scaling=scaling,
            mask=mask.dense,
            softcap=softcap,
            q_start=mask.q_offset,
            return_masses=return_masses,
        )
    q, k, v = (_last_contiguous(t) for t in (q, k, v))
    t = _Prepared.of(tables, q, keep_groups=return_masses)
    if q.shape[2] == 1:
        out, masses = _decode_path(q, k, v, t, mask, scaling, return_masses, splits)
    else:
        span = tables.image_span if tables is not None else None
        out, masses = _prefill_path(q, k, v, t, mask, scaling, return_masses, path, config, span)
    return (out, masses) if return_masses else out


def column_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    tables: LayerTables | None,
    mask: MaskInfo,
    *,
    scaling: float,
    softcap: float | None = None,
    value: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column sums (B, H, K) of the biased, unmoved map and per-key row counts (B, 1, K), as the reference.

    The rows' log-sum-exp comes from the flash bulk when `value` is given and the map is plain
    causal attention (the bulk is then kept for the next `attention` call on the same q, k, v),
    else from the prefill kernel without V (``lse_only``). `config` overrides tile shapes (tests).
    """
    if _fallback(q, k, tables, mask, softcap) is not None:
        return reference.column_scores(q, k, tables, scaling=scaling, mask=mask.dense, softcap=softcap)
    q, k = _last_contiguous(q), _last_contiguous(k)
    t = _Prepared.of(tables, q, with_moves=False)
    geo = _Geometry.of(mask, q, k)
    kw = dict(scaling=scaling, diag=geo.diag, kv_start=geo.kv_start, dense=geo.dense)
    bias = t.bias2 if t.has_bias else None
    lse = None
    if value is not None and bias is None and _flash_eligible(q, k, mask, None):
        v = _last_contiguous(value)
        bulk = _flash_with_lse(q, k, v, scaling)
        if bulk is not None:
            _stash[:] = [(_stash_key(q, k, v, scaling), (q, k, v), bulk)]
            lse = (bulk[1] * LOG2E).contiguous()
    if lse is None:
        cfg = config or pick_config(_d_pad(q), q.element_size())
        members = member_tiles(t.key_group, cfg[1]) if bias is not None else None
        _, lse, _, _ = _prefill(
            q,
            k,
            k,
            q_pos0=geo.q_pos0,
            lse_only=True,
            key_group=t.key_group if bias is not None else None,
            n_groups=t.n_groups,
            bias=bias,
            members=members,
            config=cfg,
            **kw,
        )
    cs = _colsum(q, k, lse, key_group=t.key_group, n_groups=t.n_groups, bias=bias, config=config, **kw)
    return cs, _counts(mask, geo, q.shape[0], q.shape[2], k.shape[2], q.device)


def decode_step(
    plans: dict,
    slot,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tables: LayerTables | None,
    mask: MaskInfo,
    *,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """`attention` for one query row (a decoding step), with its fixed set-up kept in ``plans[slot]``.

    The caller owns `plans` and says how long its entries live (a patch keeps one per layer and
    clears them when a new input starts); an entry is also rebuilt whenever `DecodePlan.fits` says
    that what it was built from changed. Returns (B, 1, H, D) in q's dtype.
    """
    plan = plans.get(slot)
    if plan is None or not plan.fits(q, k, tables, mask, scaling, softcap):
        plan = plans[slot] = DecodePlan(q, k, tables, mask, scaling, softcap)
    return plan(q, k, v, tables, mask)


class DecodePlan:
    """One layer's decoding steps, with what every step of an input shares worked out once.

    Kept: whether the kernels run at all (the reference fallback's reasons), the layer's tables in
    kernel form as far as they come from the plan (the log2-domain bias, whether the key groups
    change anything, the packed moves) and a `triton_decode.Decoder` (constexprs, placeholders, the
    fixed launch arguments and their part of the launch key). A step passes only what may change
    at every step: q, k, v, the key groups, the mask's geometry (key count, diagonal, positions),
    the output scale and shift (a per-input head scale is a new tensor at each forward).

    Safe to keep while `fits` holds: it compares everything the kept parts were derived from, the
    sizes and dtypes of q and k (batch size included), the device, the scaling and soft-cap, the
    table tensors by identity and version (bias, the moves tuple and its keep tensors: a plan's
    own objects, the same at every forward), which optional tables and mask forms are present.
    Moves with per-input row starts (after the image tokens) keep their packed parts; the row
    starts (per input) are read again whenever the tables bring another moves tuple. One move's row
    starts are a view of the per-input buffer (written in place), so that view is kept while the
    tuple is the same (the runtime keeps it for every step of an input); several moves' are stacked
    at every step. Nothing else per input is kept.
    """

    def __init__(self, q, k, tables: LayerTables | None, mask: MaskInfo, scaling: float, softcap):
        self.moves_ref, self.per_move = None, None
        self.signature = self._signature(q, k, tables, mask, scaling, softcap)
        if tables is not None:  # later steps with this very tuple compare it by identity
            self.moves_ref, self.per_move = tables.moves, _per_move(tables.moves)
        # the table objects compared by identity, held so that their ids are not reused (not the per-step groups)
        self.held = None if tables is None else (tables.bias, tables.moves)
        self.floats: list = [(None, None), (None, None)]  # output scale, shift: (as given, in kernel form)
        self.scaling, self.softcap = scaling, softcap
        self.decoder = None
        if _fallback(q, k, tables, mask, softcap) is not None:
            return  # every step runs `attention`, which runs the reference
        t = _Prepared.of(tables, q)
        self.use_groups = t.key_group is not None
        self.starts = None  # live moves whose row starts are per input (after the image tokens): read per step
        if t.moves is not None and any(m.row_start is not None for m in tables.moves):
            keep = [m for m in tables.moves if _is_live(m)]
            self.starts = [tables.moves.index(m) for m in keep]
            self.never = torch.full((q.shape[0],), -(2**62), dtype=torch.int64, device=q.device)
            self.rows_for, self.rows = None, None  # the moves tuple the row starts were read from, and them
        self.decoder = _Decoder(
            q,
            k,
            scaling=scaling,
            n_groups=t.n_groups,
            per_group=self.use_groups and t.moves is not None,
            bias=t.bias2 if t.has_bias else None,
            moves=t.moves,
            has_groups=self.use_groups,
            groups_per_head=self.use_groups and t.key_group.shape[1] > 1,
            has_kv_start=mask.dense is not None and mask.kv_start is not None,
            dense=mask.dense is not None and mask.kv_start is None,
            pos_on_device=torch.is_tensor(mask.q_offset),
            scale_dim=0 if t.scale is None else t.scale.dim(),
            has_shift=t.shift is not None,
            row_starts=self.starts is not None,
        )

    def _signature(self, q, k, tables: LayerTables | None, mask: MaskInfo, scaling: float, softcap) -> tuple:
        """Everything a plan is derived from, compared at each step (identities and versions of table tensors).

        The moves are compared by identity when they are the tuple the plan was made from (held), else
        move by move: a plan's own tuple, or one a forward built with per-input row starts (their keep
        tensors are the plan's).
        """
        dense = mask.dense
        sig = (
            q.shape, q.dtype, q.device, k.shape[1], k.shape[3], k.dtype, scaling, softcap, dense is None,
            mask.kv_start is None, torch.is_tensor(mask.q_offset), None if dense is None else dense.shape[1],
        )  # fmt: skip
        if tables is None:
            return sig
        groups, bias, moves, scale = tables.key_group, tables.bias, tables.moves, tables.out_scale
        per_move = self.per_move if moves is self.moves_ref else _per_move(moves)
        return sig + (
            tables.n_groups, None if groups is None else groups.shape[1], id(bias),
            None if bias is None else bias._version, per_move, [m.keep._version for m in moves],
            None if scale is None else scale.dim(), tables.out_shift is None,
        )  # fmt: skip

    def fits(self, q, k, tables: LayerTables | None, mask: MaskInfo, scaling: float, softcap) -> bool:
        return self._signature(q, k, tables, mask, scaling, softcap) == self.signature

    def _float(self, slot: int, t: torch.Tensor, device) -> torch.Tensor:
        """`t` as fp32, contiguous, on `device`; converted again only when it is another tensor or was changed."""
        given, kept = self.floats[slot]
        if given is t and kept is not None and kept[1] == t._version:
            return kept[0]
        out = t.to(device, torch.float32).contiguous()
        self.floats[slot] = (t, (out, t._version))
        return out

    def __call__(self, q, k, v, tables: LayerTables | None, mask: MaskInfo) -> torch.Tensor:
        if self.decoder is None:
            return attention(q, k, v, tables, mask, scaling=self.scaling, softcap=self.softcap)
        if q.stride(-1) != 1:
            q = q.contiguous()
        if k.stride(-1) != 1:
            k = k.contiguous()
        if v.stride(-1) != 1:
            v = v.contiguous()
        if mask.dense is None and not torch.is_tensor(mask.q_offset):  # a dynamic cache without a mask
            diag, q_pos, pos, kv_start, dense = k.shape[2] - 1, mask.q_offset, None, None, None
        else:
            geo = _Geometry.of(mask, q, k)
            diag, q_pos, pos, kv_start, dense = geo.diag, geo.q_pos0, geo.pos, geo.kv_start, geo.dense
        groups = scale = shift = None
        if tables is not None:
            if self.use_groups:
                groups = _last_contiguous(tables.key_group)
            if tables.out_scale is not None:
                scale = self._float(0, tables.out_scale, q.device)
            if tables.out_shift is not None:
                shift = self._float(1, tables.out_shift, q.device)
        starts = None
        if self.starts is not None:  # one live move (VAR): its row starts as they are, no copy
            moves = tables.moves
            if moves is self.rows_for:
                starts = self.rows
            else:
                starts = _row_starts([moves[i] for i in self.starts], q.shape[0], q.device, self.never)
                if starts._base is not None:  # a view of the per-input buffer (one move): kept for this tuple
                    self.rows_for, self.rows = moves, starts  # the tuple is held, so its id is not reused
        out, _ = self.decoder(
            q,
            k,
            v,
            diag=diag,
            q_pos=q_pos,
            pos=pos,
            kv_start=kv_start,
            dense=dense,
            key_group=groups,
            scale=scale,
            shift=shift,
            row_start=starts,
        )
        return out


def _per_move(moves: tuple) -> tuple:
    """A moves tuple's part of a decoding plan's signature: the plan's own tuple by identity; one a forward built
    with per-input row starts (a new tuple of the plan's keep tensors) move by move."""
    if any(m.row_start is not None for m in moves):
        return tuple((id(m.keep), m.row_start is None) for m in moves)
    return (id(moves),)


# --------------------------------------------------------------------------- preparation


@dataclass
class _Prepared:
    """A layer's tables in kernel form; group edits that cannot change the output are dropped."""

    key_group: torch.Tensor | None  # (B, Hg, K) uint8, last dim contiguous
    n_groups: int
    bias2: torch.Tensor | None  # (H, G) fp32, log2 domain, group 0 shifted to 0
    has_bias: bool
    moves: tuple | None  # packed for the kernels
    scale: torch.Tensor | None
    shift: torch.Tensor | None

    @classmethod
    def of(
        cls, tables: LayerTables | None, q: torch.Tensor, with_moves: bool = True, keep_groups: bool = False
    ) -> "_Prepared":
        if tables is None:
            return cls(None, 1, None, False, None, None, None)
        dev = q.device
        groups = tables.key_group if tables.key_group is not None and tables.n_groups > 1 else None
        bias2, has_bias = None, False
        if groups is not None and tables.bias is not None:
            has_bias = _memo(
                tables.bias, ("has_bias",), lambda b: bool((_host(b).float() - _host(b).float()[:, :1]).any())
            )
            if has_bias:  # softmax is unchanged by a per-row constant: shift so that unflagged keys have none
                bias2 = _memo(
                    tables.bias,
                    ("bias2", dev),
                    lambda b: ((b.float() - b.float()[:, :1]) * LOG2E).to(dev).contiguous(),
                )
        moves = None
        if with_moves and groups is not None and tables.moves:
            moves = _live_moves(tables.moves, q.shape[0], dev)
        if groups is not None and not has_bias and moves is None and not keep_groups:
            groups = None
        if groups is not None and groups.stride(-1) != 1:
            groups = groups.contiguous()
        scale = shift = None
        if with_moves and tables.out_scale is not None:
            scale = tables.out_scale.to(dev, torch.float32).contiguous()
        if with_moves and tables.out_shift is not None:
            shift = tables.out_shift.to(dev, torch.float32).contiguous()
        return cls(groups, tables.n_groups if groups is not None else 1, bias2, has_bias, moves, scale, shift)


@dataclass
class _Geometry:
    """The mask in kernel form: causal with an offset (and left padding), or a dense uint8 mask.

    `pos` is the query position as a device scalar (a static cache's) for a decoding step: the decode
    kernels read it, so a captured CUDA graph replays with each step's position; `diag` and `q_pos0`
    are then relative to it.
    """

    diag: int
    q_pos0: int
    kv_start: torch.Tensor | None
    dense: torch.Tensor | None
    pos: torch.Tensor | None = None

    @classmethod
    def of(cls, mask: MaskInfo, q: torch.Tensor, k: torch.Tensor) -> "_Geometry":
        NQ, NK = q.shape[2], k.shape[2]
        q_off, pos = mask.q_offset, None
        if torch.is_tensor(q_off):
            if NQ == 1:
                pos, q_off = q_off.reshape(1).to(q.device, torch.int64), 0
            else:
                q_off = _host_position(q_off)
        if mask.dense is None:
            return cls(NK - NQ, q_off, None, None, pos)
        if mask.kv_start is not None:
            return cls(q_off - mask.kv_offset, q_off, mask.kv_start.to(q.device, torch.int32).contiguous(), None, pos)
        dense = mask.dense if mask.dense.stride(-1) == 1 else mask.dense.contiguous()
        return cls(q_off - mask.kv_offset, q_off, None, dense.view(torch.uint8), pos)


def _host_position(q_off: torch.Tensor) -> int:
    """A prefill's query offset kept on the device (a static cache), read once on the host."""
    if capturing(q_off):
        raise AttneditError(
            "a forward of several tokens on a static cache cannot be captured in a CUDA graph with the Triton "
            "backend (its kernels are chosen by the query offset); capture decoding steps (one token per row) only"
        )
    return int(q_off)


def _live_moves(moves: tuple, B: int, device):
    """The moves that change something (keep != 1 somewhere), packed by `_pack_moves`; None when none does.

    Whether a move is live comes from `Move.live` (set when a recipe is compiled), else from its keep
    tensor read back once (a sync). What comes from the plan (which moves are live, their sources,
    destinations, gates and stacked keep rows) is kept per move (its keep tensor, a plan's own object,
    and its source, destination and gate), batch size and device; weak references make sure a new
    tensor that reuses a freed one's id never gets the old result, and the keep tensors' versions are
    checked. The key does not depend on the tuple holding the moves: under torch.compile the operator
    (`custom_ops`) rebuilds it at every call. Per-input row starts (moves after the image tokens) are
    read at every call (`_row_starts`: no copy for one move). Nothing is kept while a CUDA graph is
    being captured (its memory pool must not hold tensors beyond the graph).
    """
    key = ("live_moves", tuple((id(m.keep), m.src, m.dst, m.gate, m.row_start is None) for m in moves), B, device)
    versions = tuple(m.keep._version for m in moves)
    hit = _memo_cache.get(key)
    if hit is not None and all(r() is m.keep for r, m in zip(hit[0], moves)) and hit[1] == versions:
        live, packed = hit[2]
    else:
        live = tuple(i for i, m in enumerate(moves) if _is_live(m))
        packed = _pack_moves([moves[i] for i in live], B, device) if live else None
        if not (live and capturing(packed[2])):
            if len(_memo_cache) > 4096:
                _memo_cache.clear()
            per_input = any(moves[i].row_start is not None for i in live)
            kept = (*packed[:3], None) if per_input else packed  # per-input row starts are never kept
            _memo_cache[key] = (tuple(weakref.ref(m.keep) for m in moves), versions, (live, kept))
    if packed is None or packed[3] is not None:
        return packed
    return (*packed[:3], _row_starts([moves[i] for i in live], B, device))


def _is_live(m) -> bool:
    if m.live is not None:
        return m.live
    return _memo(m.keep, ("live",), lambda t: bool((_host(t) != 1).any()))


def _pack_moves(moves, B: int, device) -> tuple:
    """(mv_i (NM, 5) int32, mv_f (NM, 2) fp32, keep (NM, H) fp32, row_start (NM, B) int64) on the device."""
    ints = tuple((m.src, m.dst, int(m.gate is not None), *(m.gate or (0, 0, 0.0, 0.0))) for m in moves)
    key = ("moves", ints, str(device))
    if key not in _memo_cache:  # static per recipe: one host-to-device copy
        _memo_cache[key] = (
            torch.tensor([list(x[:5]) for x in ints], dtype=torch.int32, device=device),
            torch.tensor([[float(x[5]), float(x[6])] for x in ints], dtype=torch.float32, device=device),
        )
    mv_i, mv_f = _memo_cache[key]
    keep = torch.stack([m.keep.to(device, torch.float32) for m in moves])
    return mv_i, mv_f, keep, _row_starts(moves, B, device)


def _row_starts(moves, B: int, device, never: torch.Tensor | None = None) -> torch.Tensor:
    """(NM, B) int64: each move's first row per input (-2**62, every row, for a move without row starts).

    One move with per-input row starts of shape (B,) (VAR's) is passed as a view, without a copy.
    `never`: a (B,) filler of -2**62 kept by the caller (else made here when a move needs it).
    """
    if len(moves) == 1 and moves[0].row_start is not None:
        r = moves[0].row_start
        if r.shape == (B,) and r.dtype == torch.int64 and r.device == torch.device(device) and r.is_contiguous():
            return r.view(1, B)
    if never is None:
        never = torch.full((B,), -(2**62), dtype=torch.int64, device=device)
    return torch.stack(
        [m.row_start.to(device, torch.int64).expand(B) if m.row_start is not None else never for m in moves]
    )


def _counts(mask: MaskInfo, geo: _Geometry, B: int, NQ: int, NK: int, device) -> torch.Tensor:
    """(B, 1, K) fp32: how many query rows may see each key."""
    if geo.dense is not None:
        return mask.dense.float().sum(2).expand(B, 1, NK).contiguous()
    j = torch.arange(NK, device=device)
    count = (
        (NQ - (j - geo.diag).clamp_min(0)).clamp(0, NQ).float().view(1, 1, NK).expand(B, 1, NK)
    )  # rows i >= j - diag
    if geo.kv_start is not None:
        count = count * (j.view(1, 1, NK) >= geo.kv_start.view(B, 1, 1).long())
    return count.contiguous()


# --------------------------------------------------------------------------- paths


def _decode_path(q, k, v, t: _Prepared, mask: MaskInfo, scaling: float, return_masses: bool, splits: int | None):
    geo = _Geometry.of(mask, q, k)
    per_group = t.key_group is not None and (t.moves is not None or return_masses)
    return _decode(
        q,
        k,
        v,
        scaling=scaling,
        diag=geo.diag,
        q_pos=geo.q_pos0,
        pos=geo.pos,
        kv_start=geo.kv_start,
        dense=geo.dense,
        key_group=t.key_group,
        n_groups=t.n_groups,
        bias=t.bias2 if t.has_bias else None,
        per_group=per_group,
        moves=t.moves,
        scale=t.scale,
        shift=t.shift,
        write_masses=return_masses,
        splits=splits,
    )


def _prefill_path(
    q, k, v, t: _Prepared, mask: MaskInfo, scaling: float, return_masses: bool, path: str | None, config, span=None
):
    geo = _Geometry.of(mask, q, k)
    flash = _flash_eligible(q, k, mask, path)
    kw = dict(
        scaling=scaling,
        diag=geo.diag,
        q_pos0=geo.q_pos0,
        kv_start=geo.kv_start,
        dense=geo.dense,
        scale=t.scale,
        shift=t.shift,
    )
    if t.key_group is None:
        if flash and not return_masses:
            return _flash_and_scale(q, k, v, t, scaling), None
        out, _, masses, _ = _prefill(q, k, v, config=config, write_masses=return_masses, **kw)
        return out, masses
    cfg = config or pick_config(_d_pad(q), q.element_size())
    members = member_tiles(t.key_group, cfg[1])
    # config stays the caller's: the default picks the same BLOCK_N as `cfg` and its own tiles for a bulk epilogue
    kw.update(
        key_group=t.key_group, n_groups=t.n_groups, bias=t.bias2 if t.has_bias else None, moves=t.moves, config=config
    )
    if flash and span is not None and not return_masses and q.shape[2] - span[1] >= SPLIT_MIN_ROWS:
        out = _split_at_span(q, k, v, t, span, scaling, members, kw)
        if out is not None:
            return out, None
    bulk = (_take_stash(q, k, v, scaling) or _flash_with_lse(q, k, v, scaling)) if flash else None
    if bulk is not None:
        # each program reads its rows of the flash output before writing them: the result can go in place
        in_place = bulk[0].transpose(1, 2)
        out, _, masses, flags = _prefill(
            q,
            k,
            v,
            members=members,
            bulk=bulk,
            write_masses=return_masses,
            out=in_place if in_place.is_contiguous() else None,
            **kw,
        )
        _prefill(q, k, v, members=members, only_flagged=flags, out=out, **kw)  # exact rows where the bulk is not
        return out, masses
    out, _, masses, _ = _prefill(q, k, v, members=members, write_masses=return_masses, **kw)
    return out, masses


def _flash_eligible(q, k, mask: MaskInfo, path: str | None) -> bool:
    """The flash-kernel paths need plain causal attention (no padding), Q == K, fp16/bf16 on CUDA."""
    return (
        path != "fused"
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and mask.dense is None
        and q.shape[2] == k.shape[2] > 1
    )


def _flash_and_scale(q, k, v, t: _Prepared, scaling: float) -> torch.Tensor:
    """Plain causal attention by torch's SDPA, then the output scale/shift of the heads it changes."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scaling, enable_gqa=q.shape[1] != k.shape[1]
    )
    out = out.transpose(1, 2)
    if not out.is_contiguous():
        out = out.contiguous()
    if t.scale is None and t.shift is None:
        return out
    return _scale_heads(out, _changed_heads(t), t.scale, t.shift)


def _changed_heads(t: _Prepared) -> torch.Tensor:
    """int32 indices of heads whose output scale or shift is not the identity (all heads for per-input scales)."""
    ref = t.scale if t.scale is not None else t.shift
    H = t.scale.shape[-1] if t.scale is not None else t.shift.shape[0]
    if t.scale is not None and t.scale.dim() == 2:
        return torch.arange(H, dtype=torch.int32, device=ref.device)

    def find(_):
        changed = torch.zeros(H, dtype=torch.bool)
        if t.scale is not None:
            changed |= _host(t.scale) != 1
        if t.shift is not None:
            changed |= (_host(t.shift) != 0).any(-1)
        return changed.nonzero().flatten().to(ref.device, torch.int32)

    return _memo(ref, ("heads", id(t.shift) if ref is t.scale else 0), find)


def _split_at_span(
    q, k, v, t: _Prepared, span: tuple[int, int], scaling: float, members, kw, flash=None
) -> torch.Tensor | None:
    """Edits that leave rows before the image span's end alone, as flash calls on the map's pieces
    and `triton_split.combine`; None where that does not apply (the caller takes the bulk path).
    `flash(q, k, v, scaling, causal)` stands in for cuDNN in the CPU tests."""
    s, e = span
    B, H, N, D = q.shape
    if not 0 <= s < e < N or t.has_bias or t.scale is not None or t.shift is not None:
        return None
    flash = flash or _flash_with_lse
    before = flash(q[:, :, :e], k[:, :, :e], v[:, :, :e], scaling, True)
    after = flash(q[:, :, e:], k[:, :, e:], v[:, :, e:], scaling, True)
    image = flash(q[:, :, e:], k[:, :, s:e], v[:, :, s:e], scaling, False)
    if before is None or after is None or image is None:
        return None
    out = torch.empty(B, N, H, D, dtype=q.dtype, device=q.device)
    out[:, :e].copy_(before[0].transpose(1, 2))
    flags = torch.zeros(B, H, N, dtype=torch.int8, device=q.device)
    _combine(
        q,
        k,
        v,
        scaling=scaling,
        span=span,
        q_pos0=kw["q_pos0"],
        key_group=t.key_group,
        n_groups=t.n_groups,
        moves=t.moves,
        after=after,
        image=image,
        out=out,
        flags=flags,
    )
    _prefill(q, k, v, members=members, only_flagged=flags, out=out, **kw)  # exact rows where the parts are not
    return out


def _flash_with_lse(q, k, v, scaling: float, causal: bool = True):
    """(out (B, H, Q, D), lse (B, H, Q) natural log) of causal (or full) attention by torch's cuDNN kernel, or None."""
    key = (q.dtype, q.shape[1], k.shape[1], q.shape[-1], q.device.index, causal)
    if _flash_ok.get(key) is False:
        return None
    try:
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scaling)
        out, lse = res[0], res[1]
        lse = lse.reshape(q.shape[:3]).contiguous() if lse.numel() == q.shape[0] * q.shape[1] * q.shape[2] else None
        if lse is None or out.shape != q.shape:
            raise RuntimeError("unexpected output shapes")
    except (RuntimeError, AttributeError) as e:  # no cuDNN kernel for this dtype / head_dim / GQA ratio
        _flash_ok[key] = False
        _warn_once(
            f"flash:{key}",
            f"cuDNN attention with log-sum-exp unavailable for {key} ({str(e).splitlines()[0][:200]}); "
            "using the fused Triton kernel",
        )
        return None
    _flash_ok[key] = True
    return out, lse


def _stash_key(q, k, v, scaling) -> tuple:
    return tuple((x.data_ptr(), tuple(x.shape), x.stride(), x._version) for x in (q, k, v)) + (scaling,)


def _take_stash(q, k, v, scaling):
    """The bulk kept by column_scores for exactly these q, k, v (it holds them, so their memory is not reused)."""
    hit = _stash[0][2] if _stash and _stash[0][0] == _stash_key(q, k, v, scaling) else None
    _stash.clear()
    return hit


# --------------------------------------------------------------------------- helpers


def _fallback(q, k, tables: LayerTables | None, mask: MaskInfo, softcap) -> str | None:
    """Why the kernels cannot run this call (logged once per reason), or None."""
    why = None
    if softcap:
        why = "softcap"
    elif q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype:
        why = "dtype"
    elif q.shape[-1] > MAX_HEAD_DIM:
        why = "head_dim"
    elif tables is not None and tables.key_group is not None and tables.n_groups > MAX_GROUPS:
        why = "groups"
    elif mask.dense is not None and mask.kv_start is None and mask.dense.shape[1] != 1:
        why = "mask"
    elif tables is not None and tables.key_group is not None and tables.bias is not None and tables.n_groups > 1:
        if not _memo(tables.bias, ("finite",), lambda b: bool(torch.isfinite(_host(b)[:, 0]).all())):
            why = "bias"
    if why is not None:
        _warn_once(why, f"Triton backend: {FALLBACKS[why]}; this call runs the PyTorch reference")
    return why


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def _memo(t: torch.Tensor, tag: tuple, fn: Callable[[torch.Tensor], object]):
    """fn(t), computed once per tensor object and version (plan tensors live as long as their patch).

    The weak reference makes sure a new tensor that reuses a freed one's id never gets the old result.
    """
    key = (id(t), tag)
    hit = _memo_cache.get(key)
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    if len(_memo_cache) > 4096:
        _memo_cache.clear()
    value = fn(t)
    _memo_cache[key] = (weakref.ref(t), t._version, value)
    return value


def _host(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of a small plan tensor (bias, keep, scale): one device sync per tensor object.

    Raises AttneditError when the copy would be made during CUDA-graph capture (which cannot record
    it): the tables reached a captured step without what an eager forward prepares for them.
    """
    if t.device.type == "cpu":
        return t
    hit = _memo_cache.get((id(t), ("host",)))
    if (hit is None or hit[0]() is not t or hit[1] != t._version) and capturing(t):
        raise AttneditError(
            "a plan tensor would be read back to the host while a CUDA graph is captured; run one forward of "
            "this patch eagerly on the same tensors before capturing, or report the recipe (this is a bug)"
        )
    return _memo(t, ("host",), lambda x: x.detach().cpu())


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _d_pad(q: torch.Tensor) -> int:
    return max(16, next_pow2(q.shape[-1]))
