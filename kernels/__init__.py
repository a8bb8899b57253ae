"""Backends that execute the parameter tables: the PyTorch reference and the fused Triton kernels."""
from .dispatch import BACKENDS, attention, choose, column_scores, triton_status

__all__ = ["BACKENDS", "attention", "choose", "column_scores", "triton_status"]
