"""The built-in methods: importing this module registers each of them (`registry.register`)."""

from . import act, head_prune, pasta, var, vhr, zerotuning

METHODS = (act.METHOD, head_prune.METHOD, pasta.METHOD, var.METHOD, vhr.METHOD, zerotuning.METHOD)
