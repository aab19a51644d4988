"""Fused Triton kernels, installed as `automix_fast.kernels`.

Each module holds one op: the math in its docstring, the forward and backward kernels, the
host launchers and the autograd Function. Nothing here is imported by `import automix_fast`.
"""
