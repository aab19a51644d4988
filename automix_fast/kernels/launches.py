"""Record Triton kernel launches instead of running them (for ahead-of-time compilation).

Inside `with recording() as launches:` every launcher in `automix_fast.kernels` appends a
`Launch` (the kernel, its grid, its arguments as the JIT would see them, num_warps and
num_stages) to `launches` and runs nothing. The ops then accept tensors on any device
(`meta` included), so the real host code can be driven at production shapes without a GPU
or memory; bench/aot_compile.py compiles what was recorded for sm_80 / sm_90. Outputs of a
recorded op are uninitialised.

This module does not import triton: `automix_fast.ops` consults it on every call.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Launch", "TensorArg", "recording", "active"]

_launches: list | None = None


@dataclass(frozen=True)
class TensorArg:
    """What the Triton JIT specializes a tensor argument on: its dtype and its address.

    The address is the real one for allocated tensors; for `meta` tensors it is an aligned
    base (the CUDA caching allocator hands out 512-byte aligned blocks) plus the view's
    storage offset, so a slice such as proj[..., :D] keeps its true misalignment.
    """

    dtype: torch.dtype
    address: int

    def data_ptr(self) -> int:  # the name triton's specialization reads
        return self.address

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorArg":
        if t.is_meta:
            return cls(t.dtype, (1 << 20) + t.storage_offset() * t.element_size())
        return cls(t.dtype, t.data_ptr())


@dataclass
class Launch:
    kernel: Any  # triton JITFunction
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @property
    def module(self) -> str:
        """The kernel's module (a JIT function's own __module__ is triton's under the interpreter)."""
        return getattr(self.kernel, "fn", self.kernel).__module__

    @property
    def blocks(self) -> int:
        total = 1
        for g in self.grid:
            total *= int(g)
        return total


def active() -> list | None:
    """The list launches are being recorded into, or None when kernels really run."""
    return _launches


@contextlib.contextmanager
def recording():
    global _launches
    previous, _launches = _launches, []
    try:
        yield _launches
    finally:
        _launches = previous


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), or record it when recording."""
    if _launches is None:
        kernel[grid](*args, **kwargs)
        return
    tensor, of = torch.Tensor, TensorArg.of
    _launches.append(Launch(kernel, tuple(grid), tuple([of(a) if isinstance(a, tensor) else a for a in args]), kwargs))
