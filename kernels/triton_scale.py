"""In-place output scale and shift of chosen heads, for attention computed by a flash kernel.

Head pruning and VHR only scale head outputs; the attention itself is plain.
This kernel touches only the listed heads of the (B, Q, H, D) output, so
pruning a few heads costs a few heads' worth of memory traffic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import Launcher, cdiv, next_pow2, placeholders

BLOCK_ROWS = 64


@triton.jit
def _scale_heads_kernel(
    O,
    HEADS,
    SCALE,
    SHIFT,
    stride_ob,
    stride_om,
    stride_oh,
    NQ,
    NROWS,
    H,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # flattened (b, i)
    h = tl.load(HEADS + tl.program_id(1))
    b = rows // NQ
    offs_d = tl.arange(0, D_PAD)
    ok = (rows < NROWS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    ptr = (
        O
        + b[:, None].to(tl.int64) * stride_ob
        + (rows % NQ)[:, None].to(tl.int64) * stride_om
        + h * stride_oh
        + offs_d[None, :]
    )
    o = tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
    if SCALE_MODE == 1:
        o = o * tl.load(SCALE + h)
    elif SCALE_MODE == 2:
        o = o * tl.load(SCALE + b * H + h, mask=rows < NROWS, other=1.0)[:, None]
    if HAS_SHIFT:
        o = o + tl.load(SHIFT + h * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM, other=0.0)[None, :]
    tl.store(ptr, o.to(O.dtype.element_ty), mask=ok)


_LAUNCH = Launcher(_scale_heads_kernel)


def scale_heads(
    out: torch.Tensor, heads: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None
) -> torch.Tensor:
    """Scale (and shift) heads `heads` (int32 list) of out (B, Q, H, D) in place; scale (H,) or (B, H), shift (H, D)."""
    B, NQ, H, D = out.shape
    if heads.numel() == 0:
        return out
    dummy = placeholders(out.device)[1]
    grid = (cdiv(B * NQ, BLOCK_ROWS), heads.numel())
    args = (
        out,
        heads,
        scale if scale is not None else dummy,
        shift if shift is not None else dummy,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        NQ,
        B * NQ,
        H,
    )
    consts = dict(
        HEAD_DIM=D,
        D_PAD=max(16, next_pow2(D)),
        BLOCK_ROWS=BLOCK_ROWS,
        SCALE_MODE=0 if scale is None else scale.dim(),
        HAS_SHIFT=shift is not None,
    )
    _LAUNCH(grid, args, consts, 4)
    return out
