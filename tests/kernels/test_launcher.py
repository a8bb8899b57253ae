"""The launcher's compiled-kernel path, without a GPU: a stand-in for Triton's compiled kernel records its calls.

On CUDA the first launch of a specialisation goes through Triton (which compiles); the next ones call
the compiled kernel's own launcher directly (`triton_common.Compiled`), pointers passed as addresses
from a `Template`. The GPU tests run the real thing; these check the calling convention and the
fallbacks on any machine.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from attnedit.kernels import triton_common as tc  # noqa: E402


class FakeKernel:
    """What Triton hands back from a launch: `run`, `function`, `packed_metadata`, and `[grid](*args)`."""

    def __init__(self):
        self.function, self.packed_metadata = 1234, (4, 1, 0)
        self.direct: list[tuple] = []
        self.runner: list[tuple] = []

    def run(self, *args):
        self.direct.append(args)

    def __getitem__(self, grid):
        return lambda *args: self.runner.append((grid, args))


class FakeJit:
    """A @triton.jit function's stand-in: its argument names, and `[grid](...)` that 'compiles' and launches."""

    arg_names = ["X", "n", "Y", "BLOCK"]

    def __init__(self):
        self.kernels: list[FakeKernel] = []  # one per compilation
        self.generic: list[tuple] = []

    @property
    def kernel(self) -> FakeKernel:
        return self.kernels[-1]

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.generic.append((grid, args, kwargs))
            self.kernels.append(FakeKernel())
            return self.kernel

        return launch


@pytest.fixture
def cuda_free(monkeypatch):
    """The current device and stream as the launcher asks PyTorch for them, on a machine without CUDA.

    Returns a dict whose "device" is the current device (tests change it)."""
    current = {"device": 0}
    monkeypatch.setattr(tc, "_CUDA", True)
    monkeypatch.setattr(tc, "_current_device", lambda: current["device"])
    monkeypatch.setattr(tc, "_raw_stream", lambda index: 777 + index)
    return current


def test_second_launch_calls_the_compiled_launcher_with_the_runners_arguments(cuda_free):
    jit = FakeJit()
    launcher = tc.Launcher(jit)
    x, y = torch.zeros(8), torch.ones(4)
    launcher((3,), (x, 5, y), {"BLOCK": 64}, num_warps=4)
    assert len(jit.generic) == 1 and not jit.kernel.direct  # the first: Triton's generic path
    launcher((3, 2), (x, 5, y), {"BLOCK": 64}, num_warps=4)
    assert len(jit.generic) == 1 and launcher.fast == 1
    (call,) = jit.kernel.direct
    # grid padded to 3 dims, the stream, the kernel's function and metadata, no launch metadata or hooks
    assert call[:9] == (3, 2, 1, 777, 1234, (4, 1, 0), None, None, None)  # 777: device 0's stream
    assert call[9:11] == (x, 5) and call[11] is y and call[12:] == (64,)
    launcher((3,), (x, 16, y), {"BLOCK": 64}, num_warps=4)  # another specialisation (16 divides): compiled anew
    assert len(jit.generic) == 2


def test_a_kernel_compiled_on_one_device_is_not_launched_on_another(cuda_free):
    """A compiled kernel is loaded on one device: the same specialisation on another device compiles its own,
    and each device's launches use its own kernel and stream."""
    jit = FakeJit()
    launcher = tc.Launcher(jit)
    x = torch.zeros(8)
    launcher((1,), (x, 5, x), {"BLOCK": 64}, num_warps=4)
    cuda_free["device"] = 1
    launcher((1,), (x, 5, x), {"BLOCK": 64}, num_warps=4)
    assert len(jit.generic) == 2, "device 1 must not reuse device 0's kernel"
    first, second = jit.kernels
    launcher((1,), (x, 5, x), {"BLOCK": 64}, num_warps=4)
    cuda_free["device"] = 0
    launcher((1,), (x, 5, x), {"BLOCK": 64}, num_warps=4)
    assert [c[3] for c in first.direct] == [777] and [c[3] for c in second.direct] == [778]


def test_a_registered_launch_hook_sends_launches_through_tritons_runner(cuda_free):
    hooks = getattr(getattr(triton, "knobs", None), "runtime", None)
    if hooks is None or not hasattr(hooks.launch_enter_hook, "add"):
        pytest.skip("this Triton keeps launch hooks outside triton.knobs (hook chains from Triton 3.4 on)")
    jit = FakeJit()
    launcher = tc.Launcher(jit)
    x = torch.zeros(8)
    launcher((1,), (x, 5, x), {"BLOCK": 64}, num_warps=4)
    seen = []
    hooks.launch_enter_hook.add(seen.append)
    try:
        launcher((1,), (x, 5, x), {"BLOCK": 64}, num_warps=4)
    finally:
        hooks.launch_enter_hook.remove(seen.append)
    assert not jit.kernel.direct and jit.kernel.runner == [((1, 1, 1), (x, 5, x, 64))]
    launcher((1,), (x, 5, x), {"BLOCK": 64}, num_warps=4)  # the hook gone: the direct call again
    assert len(jit.kernel.direct) == 1


def test_a_template_passes_pointers_as_addresses_once_compiled(cuda_free):
    jit = FakeJit()
    launcher = tc.Launcher(jit)
    x, y = torch.zeros(8), torch.ones(4)
    tpl = tc.Template(launcher, (None, 7, y), (0,), {"BLOCK": 32}, num_warps=4)
    tpl((2,), (x,))
    ((_, args, kwargs),) = jit.generic  # the generic path gets tensors (Triton specialises on them)
    assert args[0] is x and args[2] is y and kwargs["BLOCK"] == 32
    x2 = torch.zeros(8)
    tpl((2,), (x2,))
    (call,) = jit.kernel.direct
    assert call[9:] == (x2.data_ptr(), 7, y.data_ptr(), 32)
    assert all(type(a) is int for a in call[9:])
    assert len(jit.generic) == 1
    odd = torch.zeros(9)[1:]  # not 16-byte aligned: another specialisation, through Triton with tensors
    tpl((2,), (odd,))
    assert len(jit.generic) == 2 and jit.generic[1][1][0] is odd


def test_a_template_keeps_its_compiled_kernels_per_device(cuda_free):
    """Once compiled, a template's launches skip the launcher's lookup (its key holds every fixed argument's
    specialisation); another device still compiles and launches its own kernel."""
    jit = FakeJit()
    launcher = tc.Launcher(jit)
    x, y = torch.zeros(8), torch.ones(4)
    tpl = tc.Template(launcher, (None, 7, y), (0,), {"BLOCK": 32}, num_warps=4)
    tpl((2,), (x,))  # compiles
    through = []
    launch = launcher.launch
    launcher.launch = lambda *a: (through.append(a[0]), launch(*a))
    tpl((2,), (x,))
    assert not through and launcher.fast == 1 and len(jit.kernel.direct) == 1
    cuda_free["device"] = 1
    tpl((2,), (x,))
    assert len(through) == 1 and len(jit.generic) == 2, "device 1 compiles its own kernel"
    tpl((2,), (x,))
    first, second = jit.kernels
    assert len(through) == 1 and [c[3] for c in second.direct] == [778] and len(first.direct) == 1


def test_the_interpreter_compiles_nothing_to_keep():
    """Under TRITON_INTERPRET a launch returns no compiled kernel: every launch takes Triton's path."""

    class Interpreted(FakeJit):
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                self.generic.append((grid, args, kwargs))

            return launch

    jit = Interpreted()
    launcher = tc.Launcher(jit)
    x = torch.zeros(8)
    for _ in range(2):
        launcher((1,), (x, 5, x), {"BLOCK": 64}, num_warps=4)
    assert len(jit.generic) == 2 and not launcher.cache and launcher.fast == 0


def test_compiled_moves_say_whether_they_are_live_and_the_operator_keeps_it():
    """A compiled recipe's moves carry `live` (keep != 1 somewhere), and the torch.compile operator passes it on.

    A decoding step inside a CUDA graph cannot read a keep tensor back to the host; with `live` known,
    the kernels never do. A keep tensor on the meta device stands for one that must not be read.
    """
    import models

    from attnedit.kernels import custom_ops, triton_ops
    from attnedit.modelinfo import ModelInfo
    from attnedit.recipe import Recipe
    from attnedit.tables import LayerTables, MaskInfo, Move, compile_recipe

    model = models.tiny("llama")
    info = ModelInfo.from_config(model.config)
    text = "interventions: [{type: act, tau: 0.05, beta: 0.2, heads: {1: [0]}}]"
    plans = compile_recipe(Recipe.from_str(text, "t.yaml"), info, model).layers
    moves = [m for p in plans.values() for m in p.moves]
    assert moves and all(m.live is True for m in moves)
    idle = Move(1, 2, torch.ones(4, device="meta"), live=False)
    assert triton_ops._live_moves((idle,), 2, "cpu") is None
    assert (
        triton_ops._live_moves(
            (Move(1, 2, torch.ones(4, device="meta"), row_start=torch.zeros(2), live=False),), 2, "cpu"
        )
        is None
    )
    with pytest.raises(Exception):  # not known: read back, which a meta tensor cannot be
        triton_ops._live_moves((Move(1, 2, torch.ones(4, device="meta")),), 2, "cpu")
    tables = LayerTables(None, torch.zeros(2), 4, None, (idle, Move(2, 1, torch.ones(4))), None, None)
    flat = custom_ops._flatten(tables, MaskInfo(None, 0, 0, None, torch.zeros(2)))
    back, _ = custom_ops._unflatten(*flat)
    assert [m.live for m in back.moves] == [False, None]


def test_moves_with_per_input_row_starts_are_packed_once_and_their_row_starts_read_in_place():
    """VAR's moves (row starts per input): the plan's part is packed once, the row starts are never copied.

    Under torch.compile every copy the operator makes at a call is one more kernel in each layer of the
    captured decoding step, so a second call with new row starts reuses the stacked keep rows and reads
    one move's row starts through a view; with two moves (one without row starts) they are stacked.
    """
    import gc
    import weakref

    from attnedit.kernels import triton_ops
    from attnedit.tables import Move

    keep = torch.tensor([1.0, 0.5, 1.0, 0.25])
    one = lambda starts: (Move(1, 2, keep, after_image=True, row_start=starts, live=True),)  # noqa: E731
    a, b = torch.tensor([3, 5]), torch.tensor([7, 9])
    first, second = triton_ops._live_moves(one(a), 2, "cpu"), triton_ops._live_moves(one(b), 2, "cpu")
    assert second[2] is first[2] and torch.equal(second[2], keep.view(1, 4))
    assert second[3].data_ptr() == b.data_ptr() and torch.equal(second[3], b.view(1, 2))
    assert torch.equal(first[3], a.view(1, 2))
    two = one(b) + (Move(2, 1, torch.tensor([0.5, 1.0, 1.0, 1.0]), live=True),)
    packed = triton_ops._live_moves(two, 2, "cpu")
    assert packed[3].tolist() == [[7, 9], [-(2**62), -(2**62)]] and packed[2].shape == (2, 4)
    # nothing per input is kept: the first input's row starts are freed with it
    gone = weakref.ref(a)
    del a, first
    gc.collect()
    assert gone() is None
    # without row starts (ACT's moves) the whole packing, filler row starts included, is reused as it is
    plain = (Move(1, 2, torch.tensor([0.5, 1.0, 1.0, 1.0]), live=True),)
    assert triton_ops._live_moves(plain, 2, "cpu") is triton_ops._live_moves(plain, 2, "cpu")


def test_a_plan_tensor_read_back_during_capture_is_a_clear_error(monkeypatch):
    """What was read back eagerly is reused; a first read-back while a CUDA graph is captured raises AttneditError."""
    from attnedit.errors import AttneditError
    from attnedit.kernels import triton_ops

    seen, fresh = torch.ones(3, device="meta"), torch.ones(3, device="meta")  # stand-ins for device tensors
    triton_ops._memo(seen, ("host",), lambda x: torch.ones(3))  # what an eager forward read back
    monkeypatch.setattr(triton_ops, "capturing", lambda t: True)
    assert torch.equal(triton_ops._host(seen), torch.ones(3))
    with pytest.raises(AttneditError, match="CUDA graph is captured"):
        triton_ops._host(fresh)


def test_triton_calls_run_with_their_tensors_device_current(monkeypatch):
    """A layer of a model split over GPUs runs its kernels with its own device current; no switch otherwise."""
    from attnedit.kernels import device as dev

    switched = []

    class Guard:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            switched.append(self.index)

        def __exit__(self, *exc):
            switched.append(None)

    class OnGpu:  # a stand-in for a CUDA tensor on device `index`
        def __init__(self, index):
            self.index = index

        def get_device(self):
            return self.index

    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(torch.cuda, "device", Guard)
    seen = []
    assert dev.on_device_of(OnGpu(1), lambda a, b=0: seen.append((a, b, list(switched))) or "out", 5, b=6) == "out"
    assert seen == [(5, 6, [1])] and switched == [1, None]
    switched.clear()
    dev.on_device_of(OnGpu(0), seen.append, "same")
    dev.on_device_of(torch.zeros(1), seen.append, "cpu")
    assert switched == [] and seen[-2:] == ["same", "cpu"]
