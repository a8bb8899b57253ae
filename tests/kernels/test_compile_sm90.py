"""Every kernel specialisation the interpreter cases launch compiles for a Hopper GPU (sm_90), on the CPU.

The interpreter runs the kernels' Python, not Triton's compiler: a construct the compiler rejects (a
global that is not a `tl.constexpr`, a type that changes across a branch) passes every CPU test and
fails at the first launch on a GPU. Here the launches of the interpreter cases are caught instead of
run, and each distinct specialisation goes through `triton.compile` for sm_90 down to PTX (Triton's
own NVIDIA backend and ptxas, which its wheel carries; no GPU needed).
"""

from __future__ import annotations

import os
import shutil

import kernel_cases as kc
import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from attnedit.kernels import triton_common, triton_prefill  # noqa: E402
from attnedit.kernels import triton_ops as ops  # noqa: E402

_TYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.int8: "i8",
    torch.uint8: "u8",
}


def _backend_ready() -> str | None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 replaces the compiler"
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        return "this Triton has no NVIDIA backend"
    ptxas = os.path.join(os.path.dirname(compiler.__file__), "bin", "ptxas")
    if not (os.path.exists(ptxas) or shutil.which("ptxas")):
        return "no ptxas for Triton's NVIDIA backend"
    return None


def _signature(fn, args: tuple, constexprs: dict) -> tuple[dict, dict]:
    sig, const = {}, {}
    for name, a in zip(fn.arg_names, args):
        if isinstance(a, torch.Tensor):
            sig[name] = "*" + _TYPES[a.dtype]
        elif isinstance(a, bool):
            sig[name] = "i1"
        elif isinstance(a, int):
            sig[name] = "i64" if abs(a) >= 2**31 else "i32"
        else:
            sig[name] = "fp32"
    for name in fn.arg_names[len(args) :]:
        sig[name], const[name] = "constexpr", constexprs[name]
    return sig, const


def _launches() -> list:
    """(kernel, signature, constexprs, warps, stages) of each distinct launch of the interpreter cases."""
    caught = []

    def catch(self, key, grid, args, consts, constexprs, num_warps, num_stages):
        caught.append((self.fn, *_signature(self.fn, args, constexprs), num_warps, num_stages))

    real = triton_common.Launcher.launch
    triton_common.Launcher.launch = catch
    try:  # nothing runs: outputs are left empty, so a check may fail after its launches; only they count
        for spec in kc.CASES:
            for kw in ({}, dict(config=kc.tiles(spec), splits=3)):
                _quietly(lambda s=spec, kw=kw: kc.check_attention(ops, s, **kw))
        for spec in kc.COLSUM_CASES:
            _quietly(lambda s=spec: kc.check_colsum(ops, s))
        for spec in kc.BULK_CASES:
            _quietly(lambda s=spec: kc.check_bulk(triton_prefill, ops, s, config=kc.tiles(s)))
            _quietly(lambda s=spec: kc.check_bulk(triton_prefill, ops, s))
        for spec in kc.SPLIT_CASES:
            _quietly(
                lambda s=spec: kc.check_split(ops, triton_prefill, s, n_sparse_after=s.extra.get("sparse_after", 1))
            )
    finally:
        triton_common.Launcher.launch = real
    distinct = {}
    for fn, sig, const, warps, stages in caught:
        key = (fn.__name__, tuple(sig.items()), tuple((k, repr(v)) for k, v in const.items()), warps, stages)
        distinct.setdefault(key, (fn, sig, const, warps, stages))
    return list(distinct.values())


def _quietly(check) -> None:
    try:
        check()
    except (AssertionError, RuntimeError, ValueError, IndexError):
        pass


def test_kernels_compile_for_sm90():
    why = _backend_ready()
    if why is not None:
        pytest.skip(why)
    launches = _launches()
    names = {f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}" for fn, *_ in launches}
    want = {"triton_prefill._prefill_kernel", "triton_split._combine_kernel", "triton_decode._decode_kernel"}
    assert want | {"triton_split._sparse_kernel", "triton_colsum._colsum_kernel"} <= names, names
    failed = []
    for fn, sig, const, warps, stages in launches:
        try:
            triton.compile(
                ASTSource(fn, sig, const),
                target=GPUTarget("cuda", 90, 32),
                options=dict(num_warps=warps, num_stages=stages),
            )
        except Exception as e:  # noqa: BLE001  (every compiler error is a failure of this test)
            failed.append(f"{fn.__name__} {const}: {type(e).__name__}: {str(e)[:600]}")
    assert not failed, "\n\n".join(failed)
