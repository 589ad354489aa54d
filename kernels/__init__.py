"""Triton kernels of geko_core, installed as ``geko_core.kernels``.

Importing this package needs triton; ``geko_core._backend`` decides when it is used.
"""
