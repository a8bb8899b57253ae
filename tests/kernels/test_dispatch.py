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
