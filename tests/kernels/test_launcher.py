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
        self.kernel = FakeKernel()
        self.generic: list[tuple] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.generic.append((grid, args, kwargs))
            return self.kernel

        return launch


@pytest.fixture
def cuda_free(monkeypatch):
    """The current device and stream as the launcher asks PyTorch for them, on a machine without CUDA."""
    monkeypatch.setattr(tc, "_current_device", lambda: 0)
    monkeypatch.setattr(tc, "_raw_stream", lambda index: 777)


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
    assert call[:9] == (3, 2, 1, 777, 1234, (4, 1, 0), None, None, None)
    assert call[9:11] == (x, 5) and call[11] is y and call[12:] == (64,)
    launcher((3,), (x, 16, y), {"BLOCK": 64}, num_warps=4)  # another specialisation (16 divides): compiled anew
    assert len(jit.generic) == 2


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
