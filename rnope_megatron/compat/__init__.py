"""Narrow compatibility shims. See :mod:`rnope_megatron.compat.cpu`."""
