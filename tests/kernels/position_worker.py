"""A decoding step whose query position lives on the device (a static cache), under Triton's CPU interpreter.

Started by test_device_position.py with TRITON_INTERPRET=1; prints one JSON line of max errors against the
reference: the position as an int, as a device tensor, through the ``attnedit::attention`` operator, through
that operator inside torch.compile(fullgraph=True), and through `dispatch.attention` compiled (which picks it).
"""

from __future__ import annotations

import json

import torch

from attnedit.kernels import custom_ops, dispatch, reference
from attnedit.kernels import triton_ops as ops
from attnedit.tables import LayerTables, MaskInfo, Move


def main() -> None:
    torch.manual_seed(0)
    B, H, Hkv, K, D, pos = 2, 4, 2, 70, 16, 50
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, Hkv, K, D), torch.randn(B, Hkv, K, D)
    k[:, :, pos + 1 :] = 100.0  # a static cache's slots after the query: never read
    v[:, :, pos + 1 :] = 1e4
    dense = torch.zeros(B, 1, 1, K, dtype=torch.bool)
    dense[..., : pos + 1] = True
    dense[1, ..., :3] = False  # left padding of row 1
    kg = torch.zeros(B, 1, K, dtype=torch.uint8)
    kg[0, 0, 0], kg[1, 0, 3], kg[:, 0, 10] = 1, 1, 2
    bias = torch.zeros(H, 4)
    bias[:, 1], bias[:, 2] = 1.5, -0.5
    move = Move(2, 1, torch.full((H,), 0.5), None, False, torch.tensor([40, 60]))  # row 1 starts after the query
    tables = LayerTables(kg, torch.tensor([0, 3]), 4, bias, (move,), torch.tensor([1.0, 0.5, 1.0, 2.0]), None)
    first = torch.tensor([0, 3])
    ref = reference.attention(q, k, v, tables, scaling=0.25, mask=dense, q_start=pos)

    def mask(p):
        return MaskInfo(dense, p, 0, None, first)

    err = lambda out: float((out - ref).abs().max())  # noqa: E731
    compiled = torch.compile(
        lambda q, k, v, p: custom_ops.attention(q, k, v, tables, mask(p), scaling=0.25),
        fullgraph=True,
        backend="aot_eager",
    )
    dispatched = torch.compile(
        lambda q, k, v, p: dispatch.attention("triton", q, k, v, tables, mask(p), scaling=0.25),
        fullgraph=True,
        backend="aot_eager",
    )
    print(
        json.dumps(
            {
                "int": err(ops.attention(q, k, v, tables, mask(pos), scaling=0.25)),
                "tensor": err(ops.attention(q, k, v, tables, mask(torch.tensor(pos)), scaling=0.25)),
                "operator": err(custom_ops.attention(q, k, v, tables, mask(torch.tensor(pos)), scaling=0.25)),
                "compiled": err(compiled(q, k, v, torch.tensor(pos))),
                "dispatched": err(dispatched(q, k, v, torch.tensor(pos))),
            }
        )
    )


if __name__ == "__main__":
    main()
