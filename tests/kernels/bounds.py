"""Out-of-bounds checks for Triton kernels run by Triton's CPU interpreter.

On a GPU a kernel that reads past its tensors faults only when the address
falls on an unmapped page, so an out-of-bounds read can pass every test and
then stop a long run ("illegal memory access"). Under the interpreter every
masked load and store goes through Python; `install()` wraps them and records
each access outside the storages the running kernel was given (the storage,
not the view: a read past a view but inside its storage is not flagged).

Usage: ``install()`` before the kernels run; `take()` returns and clears
what was recorded: ``(kernel, "load"|"store", where)`` tuples.
"""

from __future__ import annotations

import sys

import numpy as np

_ranges: list[tuple[int, int]] = []  # byte ranges of the running kernel's tensor arguments' storages
_kernel = ["?"]
_found: list[tuple[str, str, str]] = []
_installed = [False]


def install() -> None:
    """Wrap the interpreter's argument set-up, masked loads and masked stores (idempotent)."""
    if _installed[0]:
        return
    import triton.runtime.interpreter as I  # noqa: PLC0415  (needs TRITON_INTERPRET=1 set before import)

    init, load, store = I.GridExecutor._init_args_hst, I.InterpreterBuilder.create_masked_load, None
    store = I.InterpreterBuilder.create_masked_store

    def init_args(self, args_dev, kwargs):
        args, kw = init(self, args_dev, kwargs)
        _ranges.clear()
        for x in [*args, *kw.values()]:
            if hasattr(x, "untyped_storage"):
                s = x.untyped_storage()
                _ranges.append((s.data_ptr(), s.data_ptr() + s.nbytes()))
        _kernel[0] = getattr(self.fn, "__name__", "?")
        return args, kw

    def masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        _check(ptrs.data, mask.data, np.dtype(I._get_np_dtype(ptrs.get_element_ty())).itemsize, "load")
        return load(self, ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(self, ptrs, value, mask, cache_policy):
        _check(ptrs.data, mask.data, value.data.dtype.itemsize, "store")
        return store(self, ptrs, value, mask, cache_policy)

    I.GridExecutor._init_args_hst = init_args
    I.InterpreterBuilder.create_masked_load = masked_load
    I.InterpreterBuilder.create_masked_store = masked_store
    _installed[0] = True


def _check(ptrs, mask, itemsize: int, what: str) -> None:
    p = np.asarray(ptrs).astype(np.uint64)
    sel = p[np.broadcast_to(np.asarray(mask).astype(bool), p.shape)]
    if sel.size == 0:
        return
    ok = np.zeros(sel.shape, bool)
    for lo, hi in _ranges:
        ok |= (sel >= lo) & (sel + itemsize <= hi)
    if not ok.all():
        _found.append((_kernel[0], what, _where()))


def _where() -> str:
    """The kernel source lines on the stack (innermost first)."""
    f, lines = sys._getframe(3), []
    while f is not None and len(lines) < 4:
        name = f.f_code.co_filename
        if "kernels" in name and "triton_" in name:
            lines.append(f"{name.rsplit('/', 1)[-1]}:{f.f_lineno}")
        f = f.f_back
    return " < ".join(lines)


def take() -> list[tuple[str, str, str]]:
    """What was recorded since the last call, each distinct access site once."""
    out = sorted(set(_found))
    _found.clear()
    return out
