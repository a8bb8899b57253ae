"""The Triton backend as PyTorch custom ops, for torch.compile.

`torch.compile` sees ``attnedit::attention`` and ``attnedit::column_scores`` as
opaque operators with known output shapes (their fake implementations): it
calls the kernels as they are, without tracing the host code that prepares
them or compiling the Triton kernels again. `LayerTables` and `MaskInfo` cross
the operator boundary flattened into tensors, ints and floats.

Eager calls (and CUDA graphs captured by hand) skip the operator layer and call
`triton_ops` directly; `kernels.dispatch` picks.
"""

from __future__ import annotations

import torch

from attnedit.tables import LayerTables, MaskInfo, Move

from .device import on_device_of

_INTS_PER_MOVE = 8  # src, dst, has gate, gate num, gate den, after image, has row start, live (-1: not known)
Tensor = torch.Tensor


def _flatten(tables: LayerTables | None, mask: MaskInfo) -> tuple:
    has = tables is not None
    moves = tables.moves if has else ()
    ints: list[int] = []
    floats: list[float] = []
    keeps: list[Tensor] = []
    rows: list[Tensor] = []
    for m in moves:
        num, den, ratio, floor = m.gate if m.gate is not None else (0, 0, 0.0, 0.0)
        live = -1 if m.live is None else int(m.live)
        ints += [m.src, m.dst, int(m.gate is not None), num, den, int(m.after_image), int(m.row_start is not None)]
        ints.append(live)
        floats += [float(ratio), float(floor)]
        keeps.append(m.keep)
        if m.row_start is not None:
            rows.append(m.row_start)
    q_off = mask.q_offset
    return (
        has,
        tables.key_group if has else None,
        tables.first_key if has else mask.first_abs,
        tables.n_groups if has else 1,
        tables.bias if has else None,
        ints,
        floats,
        keeps,
        rows,
        tables.out_scale if has else None,
        tables.out_shift if has else None,
        mask.dense,
        q_off if not torch.is_tensor(q_off) else 0,
        q_off if torch.is_tensor(q_off) else None,
        mask.kv_offset,
        mask.kv_start,
        mask.first_abs,
    )


def _unflatten(
    has, key_group, first_key, n_groups, bias, ints, floats, keeps, rows, out_scale, out_shift,
    dense, q_int, q_pos, kv_offset, kv_start, first_abs,
):  # fmt: skip
    mask = MaskInfo(dense, q_pos if q_pos is not None else q_int, kv_offset, kv_start, first_abs)
    if not has:
        return None, mask
    moves, r = [], 0
    for i in range(len(ints) // _INTS_PER_MOVE):
        src, dst, has_gate, num, den, after, has_row, live = ints[i * _INTS_PER_MOVE : (i + 1) * _INTS_PER_MOVE]
        gate = (num, den, floats[2 * i], floats[2 * i + 1]) if has_gate else None
        row = None
        if has_row:
            row, r = rows[r], r + 1
        moves.append(Move(src, dst, keeps[i], gate, bool(after), row, None if live < 0 else bool(live)))
    return LayerTables(key_group, first_key, n_groups, bias, tuple(moves), out_scale, out_shift), mask


@torch.library.custom_op("attnedit::attention", mutates_args=())
def _attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    has: bool,
    key_group: Tensor | None,
    first_key: Tensor,
    n_groups: int,
    bias: Tensor | None,
    ints: list[int],
    floats: list[float],
    keeps: list[Tensor],
    rows: list[Tensor],
    out_scale: Tensor | None,
    out_shift: Tensor | None,
    dense: Tensor | None,
    q_int: int,
    q_pos: Tensor | None,
    kv_offset: int,
    kv_start: Tensor | None,
    first_abs: Tensor,
    scaling: float,
    softcap: float | None,
) -> Tensor:
    from . import triton_ops  # noqa: PLC0415  (Triton: loaded only when the operator runs)

    tables, mask = _unflatten(
        has, key_group, first_key, n_groups, bias, ints, floats, keeps, rows, out_scale, out_shift,
        dense, q_int, q_pos, kv_offset, kv_start, first_abs,
    )  # fmt: skip
    out = on_device_of(q, triton_ops.attention, q, k, v, tables, mask, scaling=scaling, softcap=softcap)
    return out.clone() if out.data_ptr() in (q.data_ptr(), k.data_ptr(), v.data_ptr()) else out


@_attention.register_fake
def _attention_fake(q, k, v, *args, **kwargs):
    B, H, Q, D = q.shape
    return q.new_empty(B, Q, H, v.shape[-1])


@torch.library.custom_op("attnedit::column_scores", mutates_args=())
def _column_scores(
    q: Tensor,
    k: Tensor,
    has: bool,
    key_group: Tensor | None,
    first_key: Tensor,
    n_groups: int,
    bias: Tensor | None,
    ints: list[int],
    floats: list[float],
    keeps: list[Tensor],
    rows: list[Tensor],
    out_scale: Tensor | None,
    out_shift: Tensor | None,
    dense: Tensor | None,
    q_int: int,
    q_pos: Tensor | None,
    kv_offset: int,
    kv_start: Tensor | None,
    first_abs: Tensor,
    scaling: float,
    softcap: float | None,
) -> tuple[Tensor, Tensor]:
    from . import triton_ops  # noqa: PLC0415  (Triton: loaded only when the operator runs)

    tables, mask = _unflatten(
        has, key_group, first_key, n_groups, bias, ints, floats, keeps, rows, out_scale, out_shift,
        dense, q_int, q_pos, kv_offset, kv_start, first_abs,
    )  # fmt: skip
    colsum, count = on_device_of(q, triton_ops.column_scores, q, k, tables, mask, scaling=scaling, softcap=softcap)
    return colsum, count.clone() if count.data_ptr() == colsum.data_ptr() else count


@_column_scores.register_fake
def _column_scores_fake(q, k, *args, **kwargs):
    B, H, Q, D = q.shape
    K = k.shape[2]
    return q.new_empty(B, H, K, dtype=torch.float32), q.new_empty(B, 1, K, dtype=torch.float32)


def attention(q, k, v, tables: LayerTables | None, mask: MaskInfo, *, scaling: float, softcap: float | None = None):
    """`triton_ops.attention` through the ``attnedit::attention`` operator."""
    return _attention(q, k, v, *_flatten(tables, mask), float(scaling), softcap)


def column_scores(q, k, tables: LayerTables | None, mask: MaskInfo, *, scaling: float, softcap: float | None = None):
    """`triton_ops.column_scores` through the ``attnedit::column_scores`` operator."""
    return _column_scores(q, k, *_flatten(tables, mask), float(scaling), softcap)
