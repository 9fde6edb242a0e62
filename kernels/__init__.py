"""Triton kernels for fastopt (installed as ``fastopt.kernels``)."""
