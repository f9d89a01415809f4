"""Triton kernels and their launchers, installed as `fastddpm.kernels`.

Import this only through `fastddpm.ops`, which decides between compiled kernels (CUDA),
the Triton interpreter (TRITON_INTERPRET=1 on the CPU) and the reference math.
"""
