"""Backends that execute the parameter tables: the PyTorch reference and the fused Triton kernels."""

if __name__ == "kernels":
    # This folder was imported under the bare name `kernels` because a source checkout's root is on
    # sys.path (`python -c ...` run from the root). transformers probes `import kernels` for the Hugging
    # Face hub-kernels package; present as an empty namespace so that probe concludes it is absent.
    __file__ = None
else:
    from .dispatch import BACKENDS, attention, choose, column_scores, triton_status

    __all__ = ["BACKENDS", "attention", "choose", "column_scores", "triton_status"]
