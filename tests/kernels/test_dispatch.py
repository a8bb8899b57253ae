"""Backend choice: CUDA tensors go to Triton under "auto", a forced backend that cannot run says why."""

from __future__ import annotations

import models
import pytest
import torch

import attnedit
from attnedit.errors import BackendError
from attnedit.kernels import choose, triton_status


def test_auto_and_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert choose("auto", torch.device("cpu")) == "reference"
    assert choose("reference", torch.device("cpu")) == "reference"


def test_unknown_backend_lists_the_allowed_ones():
    with pytest.raises(BackendError, match="unknown backend 'cuda'.*auto, reference, triton"):
        choose("cuda", torch.device("cpu"))


@pytest.mark.skipif(triton_status() is not None, reason="Triton is not installed")
def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match="forced but the tensors are on cpu.*TRITON_INTERPRET=1"):
        choose("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose("triton", torch.device("cpu")) == "triton"


@pytest.mark.skipif(triton_status() is not None, reason="Triton is not installed")
def test_patch_with_forced_triton_on_cpu_raises_at_the_first_forward(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = models.tiny("llama")
    ids, mask = models.batch()
    recipe = attnedit.Recipe.from_str("interventions: [{type: zerotuning, gamma: 2.0}]", "t.yaml")
    with (
        attnedit.patch(model, recipe, backend="triton"),
        torch.no_grad(),
        pytest.raises(BackendError, match="Use backend 'auto'"),
    ):
        model(ids, attention_mask=mask)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_auto_picks_triton_on_cuda():
    assert choose("auto", torch.device("cuda")) == "triton"


def test_patch_prepares_kernel_state_when_applied_and_per_new_device(monkeypatch):
    """What the kernels keep per device is made eagerly: when a patch is applied (its model's devices) and
    when a forward first resolves a device's backend, never first inside a compiled step, whose CUDA-graph
    warm-up would allocate it in the graphs' pool (which then refuses to go on)."""
    from attnedit.kernels import dispatch

    seen = []
    monkeypatch.setattr(dispatch, "prepare", lambda backend, device: seen.append((backend, torch.device(device))))
    model = models.tiny("llama")
    ids, mask = models.batch()
    patch = attnedit.patch(model, attnedit.Recipe.from_str("interventions: [{type: zerotuning, gamma: 2.0}]", "t.yaml"))
    assert seen == []
    with patch, torch.no_grad():
        assert seen == [("auto", torch.device("cpu"))]
        model(ids, attention_mask=mask)
        model(ids, attention_mask=mask)
    assert seen == [("auto", torch.device("cpu")), ("reference", torch.device("cpu"))]


@pytest.mark.skipif(triton_status() is not None, reason="Triton is not installed")
def test_prepare_makes_the_placeholders_of_a_cuda_device_only(monkeypatch):
    from attnedit.kernels import dispatch, triton_ops

    made = []
    monkeypatch.setattr(triton_ops, "placeholders", made.append)
    dispatch.prepare("auto", torch.device("cpu"))
    dispatch.prepare("reference", torch.device("cuda", 0))
    assert made == []
    dispatch.prepare("auto", torch.device("cuda", 1))
    assert made == [torch.device("cuda", 1)]
