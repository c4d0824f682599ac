"""kernels: fast paths (Triton) beside the plain PyTorch references they are tested against.

Nothing outside this package imports Triton directly.
"""
