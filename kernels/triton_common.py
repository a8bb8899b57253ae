"""Triton helpers shared by the prefill and decode kernels: key-group biases, group sums, moves.

Every helper works on a block of ROWS query rows and GP >= G group columns
(GP a power of two). Group masses and move coefficients follow
`kernels.reference.move_coefficients` exactly, in fp32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E_F = 1.4426950408889634  # 1/ln(2): the kernels work with exp2
LOG2E = tl.constexpr(LOG2E_F)


def emulate_bf16(dtype) -> bool:
    """Triton's CPU interpreter (3.9) multiplies bf16 matrices wrongly: round to bf16, multiply in fp32 instead."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) in plain Python (`triton.cdiv` is a JIT function: tens of microseconds a call on the host)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), in plain Python (see `cdiv`)."""
    return 1 << max(0, n - 1).bit_length()


_PLACEHOLDERS: dict = {}
_Tensor = torch.Tensor


def _spec_key(args: tuple) -> tuple:
    """What Triton specialises a compiled kernel on, for every argument (this runs per launch).

    An int gives 1 (equal to 1), 16 (a multiple of 16) or 0 within 32 bits, else (64, multiple of 16);
    a tensor gives its dtype then whether its pointer is 16-byte aligned (a dtype always starts a
    tensor's pair, so the flat tuple reads back one way); anything else gives its type.
    """
    return _spec_key_addresses(args)[0]


def _spec_key_addresses(args: tuple) -> tuple[tuple, list]:
    """(`_spec_key(args)`, args with every tensor replaced by its address), in one pass."""
    key = []
    out = []
    add, put = key.append, out.append
    for a in args:
        kind = type(a)
        if kind is int:
            if -2147483648 <= a < 2147483648:
                add(1 if a == 1 else 0 if a & 15 else 16)
            else:
                add((64, not a & 15))
            put(a)
        elif kind is _Tensor or hasattr(a, "data_ptr"):
            ptr = a.data_ptr()
            add(a.dtype)
            add(not ptr & 15)
            put(ptr)
        else:
            add(kind)
            put(a)
    return tuple(key), out


class Launcher:
    """Launch a @triton.jit kernel, reusing its compiled form for repeated argument specialisations.

    Triton's generic launch binds and specialises every parameter on every call: tens of
    microseconds for kernels with ~80 parameters, which dominates decoding and short prefills.
    A compiled kernel depends only on the constexprs, the launch options, the dtypes and Triton's
    value specialisations (integers equal to 1, divisible by 16 or beyond 32 bits; pointers
    aligned to 16 bytes), so those form the key here; a new key goes through Triton (and
    compiles), a known one calls the compiled kernel directly (`Compiled`).
    """

    def __init__(self, fn):
        self.fn = fn
        self.cache: dict = {}  # launch key -> Compiled
        self.names: dict = {}  # number of positional arguments -> names of the constexprs after them
        self.fast = 0  # launches that skipped Triton's generic path (benchmarks report it)

    def __call__(self, grid, args: tuple, constexprs: dict, num_warps: int, num_stages: int = 1) -> None:
        names = self.names.get(len(args))
        if names is None:
            names = self.names[len(args)] = self.fn.arg_names[len(args) :]
        consts = tuple(map(constexprs.__getitem__, names))
        self.launch(
            (consts, num_warps, num_stages, _spec_key(args)), grid, args, consts, constexprs, num_warps, num_stages
        )

    def launch(self, key, grid, args, consts: tuple, constexprs: dict, num_warps: int, num_stages: int) -> None:
        """Every launch ends here: the compiled kernel kept for `key` on the current device, else Triton's generic
        path (which compiles). A compiled kernel is loaded on one device, so the device is part of the key."""
        device = _current_device() if _CUDA else -1
        kernel = self.cache.get((key, device))
        if kernel is not None:
            kernel(grid, args, consts, device)
            self.fast += 1
            return
        self.compile((key, device), grid, args, constexprs, num_warps, num_stages)

    def compile(self, key, grid, args, constexprs: dict, num_warps: int, num_stages: int) -> "Compiled | None":
        """Launch through Triton's generic path (compiling at a new specialisation); keep and return the kernel."""
        kernel = self.fn[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
        if kernel is not None and hasattr(kernel, "function"):  # compiled (not the CPU interpreter)
            hit = self.cache[key] = Compiled(kernel)
            return hit
        return None

    def compiled(self, key) -> bool:
        """Whether the kernel for `key` is compiled and kept for the current device."""
        return (key, _current_device() if _CUDA else -1) in self.cache


class Compiled:
    """One compiled kernel's launches, past Triton's per-call runner.

    `CompiledKernel[grid](*args)` builds a closure, asks the driver for the current device and
    stream, and assembles launch metadata for the launch hooks at every call (Triton 3.6 does so
    even without a hook: its hook chains are never None). Decoding launches a kernel per layer and
    step, so that bookkeeping is most of a step's added host time. Here a launch calls the kernel's
    own launcher with the runner's arguments: the current raw stream from PyTorch, no launch
    metadata, no hooks. When a launch hook is registered (a profiler such as Triton's proton), the
    launch goes through the runner as usual, so hooks see every launch.
    """

    __slots__ = ("kernel", "run", "function", "meta")

    def __init__(self, kernel):
        self.kernel = kernel
        self.run = kernel.run  # the launcher (made by Triton's first launch of this kernel)
        self.function, self.meta = kernel.function, kernel.packed_metadata

    def __call__(self, grid, args, consts: tuple, device: int) -> None:
        g = tuple(grid) + (1,) * (3 - len(grid))
        if _hooked():
            self.kernel[g](*args, *consts)
            return
        self.run(g[0], g[1], g[2], _raw_stream(device), self.function, self.meta, None, None, None, *args, *consts)


def _hooked() -> bool:
    """Whether a Triton launch hook may be registered: a hook chain with calls or a callable in Triton's knobs
    (Triton 3.4 on); Triton versions without knobs keep their hooks elsewhere, so there the answer is always yes."""
    rt = getattr(getattr(triton, "knobs", None), "runtime", None)
    if rt is None:
        return True
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


_CUDA = torch.cuda.is_available()


def _current_device() -> int:
    """The current CUDA device's index, as Triton's launch takes it (callers make it the tensors' device)."""
    return torch._C._cuda_getDevice()


def _raw_stream(index: int) -> int:
    return torch._C._cuda_getCurrentRawStream(index)


class Template:
    """One kernel variant's launches with the arguments that never change between them bound once.

    A decoding step launches the same kernel variant at every step of an input with mostly the
    same arguments (plan tensors, placeholders, sizes); only a few change (the query, the cache's
    keys and values, the output, key counts). `args` holds every positional argument, those at the
    positions in `free` being replaced at each call by `values` (in that order). The fixed
    arguments' part of the launch key (`_spec_key`) and the constexprs are computed once here, so a
    launch only keys its free arguments. The template holds its fixed arguments, so their memory
    (and its alignment, part of the key) stays theirs.

    Once a specialisation is compiled, its launches pass every pointer as the address itself: the
    fixed ones read once here, the free ones as the key is made. Triton's launcher takes an int
    for a pointer as it is, where a tensor costs a method call and a driver query of the pointer
    per argument and launch.
    """

    def __init__(
        self, launcher: "Launcher", args: tuple, free: tuple[int, ...], constexprs: dict, num_warps: int, num_stages=1
    ):
        self.launcher = launcher
        self.args = list(args)
        self.free = free
        self.constexprs = constexprs
        self.num_warps, self.num_stages = num_warps, num_stages
        fixed = tuple(a for i, a in enumerate(args) if i not in set(free))
        self.consts = tuple(map(constexprs.__getitem__, launcher.fn.arg_names[len(args) :]))
        self.key = ("template", free, self.consts, num_warps, num_stages, _spec_key(fixed))
        self.addresses = [a.data_ptr() if isinstance(a, _Tensor) else a for a in args]
        self.kernels: dict = {}  # (free arguments' key, device) -> the launcher's Compiled for them

    def __call__(self, grid: tuple, values: tuple) -> None:
        spec, addresses = _spec_key_addresses(values)
        device = _current_device() if _CUDA else -1
        kernel = self.kernels.get((spec, device))
        if kernel is not None:  # compiled, and found without hashing the fixed part of the key again
            args = self.addresses.copy()
            for i, a in zip(self.free, addresses):
                args[i] = a
            kernel(grid, args, self.consts, device)
            self.launcher.fast += 1
            return
        key = (self.key, spec)
        launcher = self.launcher
        if launcher.compiled(key):  # compiled: every pointer as its address
            args, values = self.addresses.copy(), addresses
        else:  # Triton's generic path: tensors
            args = self.args.copy()
        for i, a in zip(self.free, values):
            args[i] = a
        launcher.launch(key, grid, args, self.consts, self.constexprs, self.num_warps, self.num_stages)
        hit = launcher.cache.get((key, device))
        if hit is not None:
            self.kernels[(spec, device)] = hit


def placeholders(device):
    """(int32, fp32, uint8) 8-element tensors for pointer arguments a kernel variant never reads, one set per device.

    Kept for the process: made eagerly by `dispatch.prepare` before any compiled step can make them.
    """
    key = torch.device(device)
    if key.type == "cuda" and key.index is None:
        key = torch.device("cuda", torch.cuda.current_device())
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = tuple(
            torch.zeros(8, dtype=d, device=key) for d in (torch.int32, torch.float32, torch.uint8)
        )
    return _PLACEHOLDERS[key]


def sm_count(device) -> int:
    """Multiprocessors of a CUDA device (4 elsewhere: the interpreter), cached."""
    key = ("sm", torch.device(device))
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = (
            torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        )
    return _PLACEHOLDERS[key]


@triton.jit
def dot_qk(q, kt, IEEE: tl.constexpr, EMU: tl.constexpr):
    """q (M, D) @ kt (D, N) in fp32 (true fp32 products for fp32 inputs)."""
    if IEEE:
        return tl.dot(q, kt, input_precision="ieee")
    if EMU:
        return tl.dot(q.to(tl.float32), kt.to(tl.float32))
    return tl.dot(q, kt)


@triton.jit
def dot_pv(p, v, acc, IEEE: tl.constexpr, EMU: tl.constexpr):
    """acc + p @ v, with the weights p rounded to v's dtype as in FlashAttention."""
    if IEEE:
        return tl.dot(p, v, acc, input_precision="ieee")
    if EMU:
        return tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc)
    return tl.dot(p.to(v.dtype), v, acc)


@triton.jit
def key_bias(BIAS_ROW, kg, G: tl.constexpr):
    """(N,) or (ROWS, N) log2-domain bias of keys whose group ids are `kg`; BIAS_ROW points at bias[h, 0]."""
    b = tl.zeros(kg.shape, tl.float32)
    for g in tl.static_range(G):
        b = tl.where(kg == g, tl.load(BIAS_ROW + g), b)
    return b


@triton.jit
def add_group_sums(T, p, kg, G: tl.constexpr, GP: tl.constexpr):
    """T (ROWS, GP) += per-group row sums of p (ROWS, N), keys in groups kg (N,)."""
    cols = tl.arange(0, GP)
    for g in tl.static_range(G):
        sg = tl.sum(tl.where((kg == g)[None, :], p, 0.0), 1)
        T = tl.where((cols == g)[None, :], T + sg[:, None], T)
    return T


@triton.jit
def column(C, g, GP: tl.constexpr):
    """Column g of C (ROWS, GP) as a (ROWS,) vector."""
    return tl.sum(tl.where((tl.arange(0, GP) == g)[None, :], C, 0.0), 1)


@triton.jit
def key_coef(C, kg, G: tl.constexpr, GP: tl.constexpr, FIRST: tl.constexpr = 0):
    """(ROWS, N): C[row, kg[key]] for per-row group coefficients C (ROWS, GP) and key groups kg (N,).

    Groups below FIRST get 0 (a caller whose coefficients are 0 there skips them)."""
    w = tl.zeros((C.shape[0], kg.shape[0]), tl.float32)
    for g in tl.static_range(FIRST, G):
        w = tl.where((kg == g)[None, :], column(C, g, GP)[:, None], w)
    return w


@triton.jit
def _sel_sum(X, bits, GP: tl.constexpr):
    """Row sums of X (ROWS, GP) over the columns whose bit is set in `bits`."""
    sel = ((bits >> tl.arange(0, GP)) & 1) != 0
    return tl.sum(tl.where(sel[None, :], X, 0.0), 1)


@triton.jit
def move_coefficients(mass, heads, qpos, b, MV_I, MV_F, KEEP, ROW_START, H, B, NM: tl.constexpr, GP: tl.constexpr):
    """Per-group multipliers (ROWS, GP) after the layer's moves, as `reference.move_coefficients`.

    mass (ROWS, GP) group masses of each row; heads (ROWS,) query head of each row;
    qpos (ROWS,) int64 absolute row positions; b the batch row. Move i is
    MV_I[i] = (src bits, dst bits, has gate, gate num bits, gate den bits),
    MV_F[i] = (max_ratio, min_den), KEEP[i, h], ROW_START[i, b] (int64).
    """
    cols = tl.arange(0, GP)
    c = tl.zeros(mass.shape, tl.float32) + 1.0
    for i in tl.static_range(NM):
        src = tl.load(MV_I + i * 5)
        dst = tl.load(MV_I + i * 5 + 1)
        has_gate = tl.load(MV_I + i * 5 + 2)
        keep = tl.load(KEEP + i * H + heads)
        cur = mass * c
        s_src = _sel_sum(cur, src, GP)
        s_dst = _sel_sum(cur, dst, GP)
        active = (s_dst > 0) & (keep != 1.0)
        num = _sel_sum(cur, tl.load(MV_I + i * 5 + 3), GP)
        den = _sel_sum(cur, tl.load(MV_I + i * 5 + 4), GP)
        gate_ok = (den >= tl.load(MV_F + i * 2 + 1)) & (den > 0) & (num <= tl.load(MV_F + i * 2) * den)
        active = active & ((has_gate == 0) | gate_ok)
        active = active & (qpos >= tl.load(ROW_START + i * B + b))
        freed = (1.0 - keep) * s_src
        f_src = tl.where(active, keep, 1.0)
        f_dst = tl.where(active, 1.0 + freed / tl.maximum(s_dst, 1e-30), 1.0)
        src_sel = ((src >> cols) & 1) != 0
        dst_sel = ((dst >> cols) & 1) != 0
        c = tl.where(src_sel[None, :], c * f_src[:, None], c)
        c = tl.where(dst_sel[None, :], c * f_dst[:, None], c)
    return c


@triton.jit
def finish_rows(
    acc, L, heads, b, offs_d, SCALE, SHIFT, H, HEAD_DIM: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_SHIFT: tl.constexpr
):
    """o = acc / L (0 where L == 0), then the head's output scale and shift. acc (ROWS, D), L (ROWS,)."""
    o = acc / tl.where(L > 0, L, 1.0)[:, None]
    if SCALE_MODE == 1:  # (H,)
        o = o * tl.load(SCALE + heads)[:, None]
    elif SCALE_MODE == 2:  # (B, H)
        o = o * tl.load(SCALE + b * H + heads)[:, None]
    if HAS_SHIFT:
        o = o + tl.load(
            SHIFT + heads[:, None] * HEAD_DIM + offs_d[None, :], mask=(offs_d < HEAD_DIM)[None, :], other=0.0
        )
    return o
