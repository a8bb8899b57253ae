"""Device questions the kernels and the runtime share: run a call with its tensors' CUDA device
current, and whether a CUDA graph is being captured.

Triton launches on the current CUDA device (and keeps compiled kernels per device). A model split
over several GPUs (`device_map="auto"`) runs layers on devices other than the current one, so each
Triton call runs with its query's device made current, and only switches when it differs.
"""

from __future__ import annotations

import torch


def on_device_of(t: torch.Tensor, fn, *args, **kwargs):
    """fn(*args, **kwargs) with `t`'s CUDA device current (nothing to switch for CPU tensors or the current device)."""
    index = t.get_device()
    if index >= 0 and index != torch._C._cuda_getDevice():
        with torch.cuda.device(index):
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)


def capturing(t: torch.Tensor) -> bool:
    """Whether CUDA-graph capture is under way on `t`'s device (always False on the CPU)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()
