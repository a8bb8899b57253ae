"""The interventions: one module per method (schema, compile step, target finder)."""

from . import act, head_prune, pasta, registry, var, vhr, zerotuning  # noqa: F401  (each registers itself)

__all__ = ["registry"]
