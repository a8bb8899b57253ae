"""Pick the backend that executes the tables: Triton on CUDA tensors, the PyTorch reference elsewhere.

`backend="auto"` sends CUDA tensors to the Triton kernels and everything else
to the reference. `"triton"` forces the kernels (on CPU tensors only under
``TRITON_INTERPRET=1``); `"reference"` forces the reference.
"""

from __future__ import annotations

import os

import torch

from attnedit.errors import BackendError
from attnedit.recipe import BACKENDS
from attnedit.tables import LayerTables, MaskInfo

from . import custom_ops, reference
from .device import on_device_of


def triton_status() -> str | None:
    """None when the Triton kernels can be imported, else why not."""
    try:
        from . import triton_ops  # noqa: F401, PLC0415  (Triton: optional, probed here)
    except ImportError as e:  # triton missing, or too old
        return f"the Triton kernels cannot be imported ({e})"
    return None


_TRITON: list = []


def _triton():
    """The Triton backend's module, imported at its first call (Triton is optional) and kept."""
    if not _TRITON:
        from . import triton_ops  # noqa: PLC0415  (Triton: loaded only when the backend runs)

        _TRITON.append(triton_ops)
    return _TRITON[0]


def choose(backend: str, device: torch.device) -> str:
    """Resolve a requested backend for tensors on `device`; raise BackendError if it cannot run."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "reference":
        return "reference"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "auto":
        if device.type == "cuda" and triton_status() is None:
            return "triton"
        return "reference"
    why = triton_status()
    if why is not None:
        raise BackendError(f"backend 'triton' was forced but {why}; use backend 'auto' or 'reference'")
    if device.type != "cuda" and not interpret:
        raise BackendError(
            f"backend 'triton' was forced but the tensors are on {device.type}; Triton runs on CUDA devices "
            "(or on the CPU under TRITON_INTERPRET=1, slowly). Use backend 'auto' or 'reference'."
        )
    return "triton"


def prepare(backend: str, device: torch.device) -> None:
    """Make now, eagerly, what the Triton kernels keep per CUDA device (their placeholder tensors).

    A first kernel call can come inside a step that torch.compile records into CUDA graphs (mode
    "reduce-overhead", as transformers compiles a static cache's decoding step): what it made and kept
    would stay allocated in the graphs' private memory pool, which cudagraph trees refuse ("tensor(s) in
    the cudagraph pool not tracked as outputs"). A patch calls this when it is applied, for its model's
    devices, and when it first resolves the backend of a device. Nothing to do for the reference or a CPU.
    """
    device = torch.device(device)
    if device.type == "cuda" and backend != "reference" and triton_status() is None:
        _triton().prepare(device)


def attention(
    name: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tables: LayerTables | None,
    mask: MaskInfo,
    *,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Run one layer's attention with its tables. Returns (B, Q, H, D).

    Under torch.compile the Triton backend runs as the ``attnedit::attention`` operator (`custom_ops`).
    """
    if name == "triton":
        if torch.compiler.is_compiling():
            return custom_ops.attention(q, k, v, tables, mask, scaling=scaling, softcap=softcap)
        return on_device_of(q, _triton().attention, q, k, v, tables, mask, scaling=scaling, softcap=softcap)
    return reference.attention(
        q, k, v, tables, scaling=scaling, mask=mask.dense, softcap=softcap, q_start=mask.q_offset
    )


def decode_step(
    name: str,
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
    """`attention` for a decoding step (one query row), keeping the backend's fixed set-up in ``plans[slot]``.

    The caller owns `plans` and clears it when a new input starts; the Triton backend keeps a
    `triton_ops.DecodePlan` there (and rebuilds it when anything it was made from changed). Under
    torch.compile, and for the reference, this is `attention`.
    """
    if name == "triton" and not torch.compiler.is_compiling():
        return on_device_of(
            q, _triton().decode_step, plans, slot, q, k, v, tables, mask, scaling=scaling, softcap=softcap
        )
    return attention(name, q, k, v, tables, mask, scaling=scaling, softcap=softcap)


def column_scores(
    name: str,
    q: torch.Tensor,
    k: torch.Tensor,
    tables: LayerTables | None,
    mask: MaskInfo,
    *,
    scaling: float,
    softcap: float | None = None,
    value: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column sums of the attention map and per-key row counts (ACT's sink statistics).

    `value`, when given, lets the Triton backend compute the flash attention bulk once and reuse it
    for the `attention` call on the same q, k, v that follows; the reference ignores it.
    """
    if name == "triton":
        if torch.compiler.is_compiling():
            return custom_ops.column_scores(q, k, tables, mask, scaling=scaling, softcap=softcap)
        return on_device_of(
            q, _triton().column_scores, q, k, tables, mask, scaling=scaling, softcap=softcap, value=value
        )
    return reference.column_scores(q, k, tables, scaling=scaling, mask=mask.dense, softcap=softcap)
